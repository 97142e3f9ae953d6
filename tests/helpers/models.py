"""Tiny models of real architectures as GPTQ folders, and llama.cpp's logits: what the GGUF, vLLM and architecture
tests share."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.assets import smollm2_dir
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.rtn import rtn_quantize

HEADS, KV_HEADS = 4, 2


def build_llama_gptq(folder, bits=4, group_size=32, act_order=False, architecture="LlamaForCausalLM", seed=0):
    """A tiny LLaMA with SmolLM2's tokenizer (llama.cpp's converter recognises it) as a v1 GPTQ folder.
    q/k weights are drawn large, so attention is sharp and a wrong rotary row order shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    gen, tensors = torch.Generator().manual_seed(seed), {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            weight = module.weight.data * (15 if name.endswith(("q_proj", "k_proj")) else 1)
            g_idx = None
            if act_order:
                g_idx = (torch.argsort(torch.randperm(module.in_features, generator=gen)) // group_size).to(torch.int32)
            qt = rtn_quantize(weight, bits, group_size, g_idx)
            tensors.update({f"{name}.{k}": getattr(qt, k) for k in ("qweight", "qzeros", "scales", "g_idx")})
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] + ".qweight" not in tensors:
            tensors[key] = value.half()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_shard(folder / "model.safetensors", tensors)
    config = dict(model.config.to_dict(), dtype="float16", architectures=[architecture])
    ckpt.write_configs(folder, config, ckpt.output_quant_config({"bits": bits, "group_size": group_size,
                                                                 "desc_act": act_order}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, folder / name)
    return folder


VOCAB = 512  # the converter pads the sentencepiece vocabulary to the model's with unused tokens
# head_dim 64: vLLM's CPU attention takes no smaller head (tests/test_vllm_architectures.py uses these too)
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2)
ARCHITECTURES = {
    "MistralForCausalLM": ("MistralConfig", dict(sliding_window=None)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(use_sliding_window=False)),  # q/k/v biases by construction
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=64, use_sliding_window=False)),
    # Gemma ties its head to the embedding (llama.cpp's converter writes no output.weight for it)
    "Gemma2ForCausalLM": ("Gemma2Config", dict(head_dim=64, sliding_window=512, query_pre_attn_scalar=64,
                                               tie_word_embeddings=True)),
    "Phi3ForCausalLM": ("Phi3Config", dict(pad_token_id=0)),  # fused qkv_proj and gate_up_proj
}


def build_gptq(folder, architecture: str, tokenizer, seed: int = 0):
    """A tiny random `architecture` as a v1 GPTQ folder (4-bit g32), every float tensor (biases too) kept.
    `tokenizer`: sentencepiece model bytes (written as tokenizer.model; vocabulary 512), or a model folder whose
    tokenizer.json and tokenizer_config.json are copied (the vocabulary is then that tokenizer's)."""
    import transformers

    config_name, extra = ARCHITECTURES[architecture]
    vocab = VOCAB if isinstance(tokenizer, bytes) else len(transformers.AutoTokenizer.from_pretrained(tokenizer))
    config = getattr(transformers, config_name)(**dict(COMMON, vocab_size=vocab, **extra))
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    tensors = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                sharp = 15 if name.endswith(("q_proj", "k_proj")) else 1  # sharp attention shows a wrong row order
                qt = rtn_quantize(module.weight.data * sharp, 4, 32, None)
                tensors.update({f"{name}.{k}": getattr(qt, k) for k in ("qweight", "qzeros", "scales", "g_idx")})
                if module.bias is not None:
                    module.bias.normal_(0, 0.5)  # visible biases: dropping one would show
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # as save_pretrained: no tied duplicate
    for key, value in model.state_dict().items():
        if key not in tied and (not key.endswith(".weight") or key.rpartition(".")[0] + ".qweight" not in tensors):
            tensors[key] = value.half()
    folder.mkdir(parents=True)
    ckpt.write_shard(folder / "model.safetensors", tensors)
    config_dict = dict(model.config.to_dict(), dtype="float16", architectures=[architecture])
    ckpt.write_configs(folder, config_dict, ckpt.output_quant_config({"bits": 4, "group_size": 32, "desc_act": False}))
    if isinstance(tokenizer, bytes):
        (folder / "tokenizer.model").write_bytes(tokenizer)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((Path(tokenizer) / name).read_bytes())
    return folder


def random_exact_adapter(base, out):
    """An exact QA-LoRA adapter with trained scales, drawn large enough to move zeros and scales."""
    model = get_peft_model(load_gptq_model(base), QALoraConfig(r=4, merge_strategy="exact"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "scale" in name else 0.3))
    model.save_pretrained(out)
    return out


def transformers_logprobs(folder, ids: torch.Tensor) -> torch.Tensor:
    model = load_gptq_model(folder).eval()  # float32 activations
    with torch.no_grad():
        logits = model(ids).logits.float()
    return token_logprobs(logits, ids)


def llama_cpp_logprobs(path, ids: torch.Tensor) -> torch.Tensor:
    return token_logprobs(llama_cpp_logits(path, ids), ids)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n, seq - 1) log-probability of each next token."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]


def llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """(n, seq, vocab) float32 logits of llama.cpp (llama-cpp-python) on each row of `ids`."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=ids.shape[1],
                          n_batch=ids.shape[1], n_threads=2, seed=0)
    try:
        rows = []
        for row in ids:
            llm.reset()
            llm.eval(row.tolist())
            rows.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(rows)
    finally:
        llm.close()


