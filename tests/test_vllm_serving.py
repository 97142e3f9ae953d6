"""Real vLLM 0.32 (CPU build, its own venv) on folders of SmolLM2-135M cut to 2 layers.

The control is a SYMMETRIC GPTQ folder made by GPTQModel, which vLLM serves natively (auto_gptq ->
CPUWNA16LinearKernel): it must score and continue prompts as our transformers loader does. The same
control proves the reference `cpu_gemm_wna16` (tests/helpers/vllm_reference_gemm.py) that the runner
registers on CPUs whose vLLM library lacks the op. Our asymmetric GPTQ folders (the base, and a merged
model) must be refused: vLLM 0.32 reads only symmetric GPTQ. What it must serve instead: the merged
model exported to AWQ and to compressed-tensors, equal to the trained model; and the base exported
to AWQ with the adapter as a standard LoRA (`enable_lora`), equal to the unmerged QA-LoRA model.
All jobs run in one vLLM process: its import and engine starts dominate the cost.
"""

import json
import subprocess
import time

import pytest
import torch
from helpers import HELPERS
from helpers.serving_compare import (VLLM_PYTHON, build_smollm2_cut, compare_with_ours, requires_vllm, run_vllm,
                                     subprocess_env, vllm_job)
from transformers import AutoTokenizer

from peft_qalora import export, export_lora
from peft_qalora.exports import merge_and_export
from peft_qalora.assets import shakespeare_dir
from peft_qalora.training.data import DataConfig, load_windows
from peft_qalora.merge.files import merge_checkpoint
from peft_qalora.base.quantize import QuantizeSettings, quantize_model
from peft_qalora.base.load import load_gptq_model
from peft_qalora.training.recipe import TrainSettings, train_adapter

pytestmark = [pytest.mark.slow, requires_vllm]

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
           "To be, or not to be: that is the", "My favourite recipe for a quick dinner starts with"]
# vLLM computes in float16 (its CPU int4 kernel takes fp16/bf16 only); we score in float32, the exact
# dequantized model. On this control, our own fp16 run differs from our fp32 run by up to 0.019 in
# log-probability: that is fp16 rounding alone. vLLM differed by up to 0.024. 0.05 leaves room for
# rounding that lands differently on another CPU, while a wrong weight is far above it: the asymmetric
# quantization of the same weights moves these log-probabilities by 0.33 to 4.6.
TOL = 0.05


def quantized(cut, folder, sym: bool):
    return quantize_model(cut, folder, QuantizeSettings(bits=4, group_size=32, calibration_windows=16, sym=sym))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"sym": ..., "asym": ...}: GPTQModel 4-bit group-32 folders of the same 2-layer cut."""
    root = tmp_path_factory.mktemp("vllm-serving")
    cut = build_smollm2_cut(root / "cut")
    return {name: quantized(cut, root / name, sym)["out_dir"] for name, sym in (("sym", True), ("asym", False))}


def trained(base, out, strategy: str):
    """A few steps of training on held-in Shakespeare (lr high enough that every layer moves)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    windows, _ = load_windows(tokenizer, shakespeare_dir(), DataConfig(seq_len=64, train_windows=16, eval_windows=1))
    summary = train_adapter(base, windows, out, TrainSettings(steps=4, learning_rate=1e-3, merge_strategy=strategy, scales_only=False))
    return summary["model"].eval()


@pytest.fixture(scope="module")
def exports(folders, tmp_path_factory):
    """The deploy paths of the issue: merged -> AWQ / compressed-tensors; base -> AWQ + standard LoRA."""
    root, base = tmp_path_factory.mktemp("exports"), folders["asym"]
    exact = trained(base, root / "adapter-exact", "exact")  # the default: exact shifts + trained scales
    merge_checkpoint(base, root / "adapter-exact", root / "merged-gptq", progress=False)
    for fmt in ("awq", "compressed-tensors"):
        merge_and_export(base, root / "adapter-exact", root / f"merged-{fmt}", fmt, progress=False)
    nearest = trained(base, root / "adapter-nearest", "nearest")
    export(base, root / "base-awq", "awq", progress=False)
    export_lora(root / "adapter-nearest", root / "lora-std", base)
    return {"root": root, "exact": exact, "nearest": nearest}


@pytest.fixture(scope="module")
def served(folders, exports):
    """One vLLM process for every job."""
    start, root = time.time(), exports["root"]
    document = run_vllm([vllm_job(folders["sym"], PROMPTS),
                         vllm_job(folders["asym"], PROMPTS[:1], max_tokens=1, expect_error=True),
                         vllm_job(root / "merged-gptq", PROMPTS[:1], max_tokens=1, expect_error=True),
                         vllm_job(root / "merged-awq", PROMPTS),
                         vllm_job(root / "merged-compressed-tensors", PROMPTS),
                         vllm_job(root / "base-awq", PROMPTS, lora=str(root / "lora-std"))])
    print(f"vLLM run: {time.time() - start:.1f} s, reference_gemm={document['reference_gemm']}")
    return document


@pytest.fixture(scope="module")
def ours(folders):
    return load_gptq_model(folders["sym"], dtype=torch.float32).eval()


def test_symmetric_gptq_matches_transformers(served, ours, folders):
    control = served["results"][0]
    tokenizer = AutoTokenizer.from_pretrained(folders["sym"])
    assert [p["prompt_ids"] for p in control["prompts"]] == [tokenizer(t).input_ids for t in PROMPTS]
    measured = compare_with_ours(ours, control, TOL)
    print(json.dumps(measured, indent=1))


def test_asymmetric_gptq_is_refused(served):
    """Our GPTQ folders, base and merged: the README's support table says vLLM 0.32 refuses them."""
    for refused in served["results"][1:3]:
        assert "Unsupported quantization config: bits=4, sym=False" in refused["error"]


@pytest.mark.parametrize("job,fmt", [(3, "awq"), (4, "compressed-tensors")])
def test_merged_export_serves_the_trained_model(served, exports, job, fmt):
    """vLLM on the exported merge computes what the trained (exact) adapter model computes."""
    measured = compare_with_ours(exports["exact"], served["results"][job], TOL)
    print(fmt, json.dumps(measured))


def test_base_awq_with_standard_lora_serves_the_unmerged_adapter(served, exports):
    """vLLM's LoRA on the AWQ base computes what the unconstrained QA-LoRA adapter computes."""
    measured = compare_with_ours(exports["nearest"], served["results"][5], TOL)
    print("lora", json.dumps(measured))


def test_reference_gemm_matches_compiled_op():
    """Where vLLM's library has the compiled op, the reference equals it up to float rounding."""
    proc = subprocess.run([str(VLLM_PYTHON), str(HELPERS / "vllm_reference_gemm.py")], capture_output=True,
                          text=True, env=subprocess_env(), timeout=600, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["native"]:
        pytest.skip("this CPU's vLLM library has no cpu_gemm_wna16; the control test ran on the reference")
    # Relative to the largest output: 2^-10 and 2^-7 are two units in the last place of fp16 and bf16
    # there; the two differ only in the order of their float32 sums.
    for case, diff in report["max_rel_diff"].items():
        assert diff <= (2**-10 if case.startswith("float16") else 2**-7), (case, diff)


def test_reference_gemm_serves_the_control(served, ours, folders):
    """The whole engine on the reference op (forced where the compiled one exists) matches transformers too."""
    if served["reference_gemm"]:
        pytest.skip("the control test already ran on the reference op")
    document = run_vllm([vllm_job(folders["sym"], PROMPTS)], VLLM_RUNNER_REFERENCE_GEMM="force")
    assert document["reference_gemm"]
    print(json.dumps(compare_with_ours(ours, document["results"][0], TOL), indent=1))
