"""Shared fixtures: tiny GPTQ checkpoints built in the test (RTN-quantized random LLaMA models)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_qalora  # noqa: E402,F401
from peft_qalora.gptq import checkpoint as ckpt  # noqa: E402
from peft_qalora.gptq.rtn import rtn_quantize  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i) if 32 <= i < 127 else f"<{i}>": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", eos_token="<1>", pad_token="<2>")


def build_tiny_gptq(folder: Path, bits: int = 4, group_size: int = 32, act_order: bool = False, seed: int = 0):
    """Write a tiny LLaMA as a v1 GPTQ checkpoint: every decoder linear RTN-quantized, lm_head float."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            g_idx = None
            if act_order:
                perm = torch.randperm(module.in_features, generator=gen)
                g_idx = (torch.argsort(perm) // group_size).to(torch.int32)
            qt = rtn_quantize(module.weight.data, bits, group_size, g_idx)
            tensors.update({f"{name}.qweight": qt.qweight, f"{name}.qzeros": qt.qzeros,
                            f"{name}.scales": qt.scales, f"{name}.g_idx": qt.g_idx})
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] + ".qweight" not in tensors:
            tensors[key] = value.half()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_shard(folder / "model.safetensors", tensors)
    quant = ckpt.output_quant_config({"bits": bits, "group_size": group_size, "desc_act": act_order})
    config = model.config.to_dict()
    config["dtype"] = "float16"
    ckpt.write_configs(folder, config, quant)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gptq_factory(tmp_path_factory):
    """`factory(bits=4, act_order=False)` -> folder of a cached tiny GPTQ checkpoint."""
    cache = {}

    def factory(bits: int = 4, group_size: int = 32, act_order: bool = False) -> Path:
        key = (bits, group_size, act_order)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{bits}b-g{group_size}{'-act' if act_order else ''}")
            cache[key] = build_tiny_gptq(folder, bits, group_size, act_order)
        return cache[key]

    return factory


@pytest.fixture
def tiny_gptq(tiny_gptq_factory) -> Path:
    return tiny_gptq_factory(4)


def quant_config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.fixture
def code_cache_setting():
    """`set(value)`: this process's code cache (kernels.set_code_cache) in a test; the environment's comes back after."""
    from peft_qalora.tuners.kernels import set_code_cache

    yield set_code_cache
    set_code_cache(None)
