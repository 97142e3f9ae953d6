"""vLLM 0.32 (CPU build) serving the AWQ and compressed-tensors exports of exact merges beyond LLaMA: Mistral,
Qwen2 (q/k/v biases, an untied head), Qwen3 (q/k norms), Gemma 2 (tied head, soft-capping; bf16: vLLM refuses
it in fp16) and Phi-3 (fused qkv_proj and gate_up_proj), tiny random models with SmolLM2's tokenizer.

Each export must score its prompts and continue them as transformers + GPTQModel does on the merged GPTQ
folder (log-probabilities within the fp16 tolerance of tests/test_vllm_serving.py); the base's own AWQ export
is the control that must land far off. One vLLM process serves every job.
"""

import json
import time

import pytest
import torch
from helpers.models import ARCHITECTURES, build_gptq, random_exact_adapter
from helpers.serving_compare import compare_with_ours, requires_vllm, run_vllm, vllm_job

from peft_qalora import export, load_gptq_model
from peft_qalora.assets import smollm2_dir
from peft_qalora.exports import merge_and_export
from peft_qalora.merge.files import merge_checkpoint

pytestmark = [pytest.mark.slow, requires_vllm]

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
TOL = 0.05  # fp16 against our fp32: see tests/test_vllm_serving.py
DTYPES = {"Gemma2ForCausalLM": "bfloat16"}  # vLLM refuses Gemma 2 in float16 ("numerical instability")
FORMATS = ("awq", "compressed-tensors")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root, jobs, folders = tmp_path_factory.mktemp("vllm-arch"), [], {}
    for architecture in sorted(ARCHITECTURES):
        base = build_gptq(root / architecture / "base", architecture, smollm2_dir())
        adapter = random_exact_adapter(base, root / architecture / "adapter")
        merge_checkpoint(base, adapter, root / architecture / "merged", progress=False)
        for fmt in FORMATS:
            merge_and_export(base, adapter, root / architecture / fmt, fmt, progress=False)
            jobs.append(vllm_job(root / architecture / fmt, PROMPTS, max_tokens=8,
                                 dtype=DTYPES.get(architecture, "float16")))
        export(base, root / architecture / "base-awq", "awq", progress=False)
        jobs.append(vllm_job(root / architecture / "base-awq", PROMPTS, max_tokens=8,
                             dtype=DTYPES.get(architecture, "float16")))
        folders[architecture] = root / architecture
    start = time.time()
    document = run_vllm(jobs)
    print(f"vLLM run: {time.time() - start:.1f} s, reference_gemm={document['reference_gemm']}")
    per_arch = len(FORMATS) + 1
    results = {a: document["results"][i * per_arch:(i + 1) * per_arch] for i, a in enumerate(sorted(ARCHITECTURES))}
    return folders, results


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_vllm_serves_merged_exports_as_transformers_runs_the_merged_gptq(served, architecture):
    folders, results = served
    ours = load_gptq_model(folders[architecture] / "merged").eval()
    tol = TOL  # bf16 too: Gemma 2 measured within 0.008
    with torch.no_grad():
        for fmt, result in zip(FORMATS, results[architecture]):
            measured = compare_with_ours(ours, result, tol)
            print(architecture, fmt, json.dumps(measured))
        control = results[architecture][-1]
        assert control.get("error") is None, control["error"]
        with pytest.raises(AssertionError):  # the unmerged base must not pass for the merged model
            compare_with_ours(ours, control, tol)
