"""The GGUF export beyond LLaMA: Mistral, Qwen2 (q/k/v biases, an untied head), Qwen3 (per-head q/k norms),
Gemma 2 (norms stored as 1 + w by the converter, a tied head) and Phi-3 (fused qkv_proj and gate_up_proj), each
converted by llama.cpp's own model class and checked by llama.cpp itself.

For each architecture, a tiny random model with a small sentencepiece tokenizer trained in the test (the
converter reads any `tokenizer.model`; BPE tokenizers must be in its table of known pre-tokenizers) is
RTN-quantized to a GPTQ folder, an exact QA-LoRA adapter (random, non-identity, trained scales) is merged
into it file to file, and llama.cpp's log-probabilities of the GGUF merge are compared with transformers +
GPTQModel on the merged GPTQ folder; the unmerged base's GGUF is the control that must land far off.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import (ARCHITECTURES, VOCAB, build_gptq, llama_cpp_logprobs, random_exact_adapter,
                            transformers_logprobs)

from peft_qalora.exports.gguf import export_gguf, merge_gguf
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.merge.files import merge_checkpoint


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_llama_cpp_runs_the_merged_gguf_as_transformers_runs_the_merged_gptq(architecture, tmp_path, tiny_spm):
    base = build_gptq(tmp_path / "base", architecture, tiny_spm)
    adapter = random_exact_adapter(base, tmp_path / "adapter")
    merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    report, summary = merge_gguf(base, adapter, tmp_path / "merged.gguf", progress=False)
    linears = sum(1 for key in ckpt.ShardReader(base).key_to_shard if key.endswith(".qweight"))  # Phi-3 fuses: 8
    assert summary["architecture"] == architecture and report["total"]["layers"] == summary["layers"] == linears
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
