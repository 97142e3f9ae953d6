"""Tiny GPTQ checkpoints built in the test: RTN-quantized random LLaMA models, and their tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.rtn import rtn_quantize

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


def quant_config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]
