"""The GGUF export beyond LLaMA: Mistral, Qwen2 (q/k/v biases, an untied head) and Qwen3 (per-head q/k norms),
each converted by llama.cpp's own model class and checked by llama.cpp itself.

For each architecture, a tiny random model with a small sentencepiece tokenizer trained in the test (the
converter reads any `tokenizer.model`; BPE tokenizers must be in its table of known pre-tokenizers) is
RTN-quantized to a GPTQ folder, an exact QA-LoRA adapter (random, non-identity, trained scales) is merged
into it file to file, and llama.cpp's log-probabilities of the GGUF merge are compared with transformers +
GPTQModel on the merged GPTQ folder; the unmerged base's GGUF is the control that must land far off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.exports.gguf import export_gguf, merge_gguf
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.rtn import rtn_quantize
from peft_qalora.merge_files import merge_checkpoint

VOCAB = 512  # the converter pads the sentencepiece vocabulary to the model's with unused tokens
# head_dim 64: vLLM's CPU attention takes no smaller head (tests/test_vllm_architectures.py uses these too)
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2)
ARCHITECTURES = {
    "MistralForCausalLM": ("MistralConfig", dict(sliding_window=None)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(use_sliding_window=False)),  # q/k/v biases by construction
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=64, use_sliding_window=False)),
}


def build_gptq(folder, architecture: str, tokenizer, seed: int = 0):
    """A tiny random `architecture` as a v1 GPTQ folder (4-bit g32), every float tensor (biases too) kept.
    `tokenizer`: sentencepiece model bytes (written as tokenizer.model; vocabulary 512), or a model folder whose
    tokenizer.json and tokenizer_config.json are copied (the vocabulary is then that tokenizer's)."""
    import transformers

    config_name, extra = ARCHITECTURES[architecture]
    vocab = VOCAB if isinstance(tokenizer, bytes) else len(transformers.AutoTokenizer.from_pretrained(tokenizer))
    config = getattr(transformers, config_name)(**dict(COMMON, vocab_size=vocab), **extra)
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
    for key, value in model.state_dict().items():
        if not key.endswith(".weight") or key.rpartition(".")[0] + ".qweight" not in tensors:
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
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=ids.shape[1],
                          n_batch=ids.shape[1], n_threads=2, seed=0)
    try:
        rows = []
        for row in ids:
            llm.reset()
            llm.eval(row.tolist())
            rows.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
    finally:
        llm.close()
    return token_logprobs(torch.stack(rows), ids)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n, seq - 1) log-probability of each next token."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_llama_cpp_runs_the_merged_gguf_as_transformers_runs_the_merged_gptq(architecture, tmp_path, tiny_spm):
    base = build_gptq(tmp_path / "base", architecture, tiny_spm)
    adapter = random_exact_adapter(base, tmp_path / "adapter")
    merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    report, summary = merge_gguf(base, adapter, tmp_path / "merged.gguf", progress=False)
    assert summary["architecture"] == architecture and report["total"]["layers"] == summary["layers"] == 14
    export_gguf(base, tmp_path / "base.gguf", progress=False)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = transformers_logprobs(tmp_path / "merged", ids)
    merged = (llama_cpp_logprobs(tmp_path / "merged.gguf", ids) - ours).abs().mean()
    control = (llama_cpp_logprobs(tmp_path / "base.gguf", ids) - ours).abs().mean()
    print(f"{architecture}: |llama.cpp - transformers| log-prob {float(merged):.4f}, unmerged base {float(control):.4f}")
    assert float(merged) < 0.02, float(merged)  # llama.cpp quantizes activations to 8 bits in Q4_1 matmuls
    assert float(control) > 10 * float(merged), (float(control), float(merged))


def test_an_architecture_the_converter_does_not_know_is_refused_before_writing(tmp_path, tiny_spm):
    base = build_gptq(tmp_path / "base", "Qwen2ForCausalLM", tiny_spm)
    config = ckpt.read_config(base)
    config["architectures"] = ["NoSuchForCausalLM"]
    ckpt.write_configs(base, {k: v for k, v in config.items() if k != "quantization_config"},
                       config["quantization_config"])
    with pytest.raises(ValueError, match="llama.cpp's converter .* does not know NoSuchForCausalLM"):
        export_gguf(base, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists()
