"""Comparing what a serving engine computes on an exported folder with what our model computes.

`run_vllm(jobs)` runs tests/helpers/vllm_runner.py in the vLLM venv (a separate venv: vLLM pins its own torch)
and returns its JSON document. `our_scores(model, prompt_ids, gen_ids)` scores the same tokens with
one teacher-forced forward of our model. `assert_agrees(result, ours, tol)` checks a job's result
against those scores and returns the numbers measured. Teacher forcing on the engine's own tokens
compares every generated position's decision, not just the prefix up to a first disagreement: when
all agree, our free-running greedy continuation is the engine's, token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).resolve().parent
VLLM_VENV = HELPERS.parents[1] / os.environ.get("VLLM_VENV", ".venv-vllm")  # the Makefile's, relative to the repo
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
RUNNER = HELPERS / "vllm_runner.py"
# `make test` builds the venv first; only a bare `pytest` without it skips.
requires_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                   reason=f"no vLLM venv at {VLLM_VENV} (make test builds it)")


def build_smollm2_cut(folder: Path, layers: int = 2) -> Path:
    """SmolLM2-135M cut to its first `layers` decoder layers, with its tokenizer (fast to quantize and serve)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_qalora.assets import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(folder)
    return folder


def subprocess_env(**extra: str) -> dict[str, str]:
    """Our environment without what points into the main venv, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


def vllm_job(model: Path, prompts: list, max_tokens: int = 32, **options) -> dict:
    """One runner job: greedy, float16 (vLLM's CPU W4A16 kernels take fp16/bf16 only), no LoRA by default."""
    return {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "dtype": "float16", "lora": None,
            "max_lora_rank": 16, "expect_error": False, **options}


def run_vllm(jobs: list[dict], timeout: float = 1800, **env: str) -> dict:
    """Run the jobs in one vLLM process: `{"reference_gemm", "vllm_version", "results": [per job]}`."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(jobs, default=str))  # default=str: Path folders
        proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), str(jobs_file)], capture_output=True, text=True,
                              timeout=timeout, env=subprocess_env(**env), cwd=tmp)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
        raise AssertionError(f"vllm_runner.py failed (exit code {proc.returncode}); its stderr ends with:\n{tail}")
    return json.loads(lines[-1])


@torch.no_grad()
def our_scores(model: torch.nn.Module, prompt_ids: list[int], gen_ids: list[int]) -> dict:
    """Our log-probabilities of prompt_ids[1:] and gen_ids, our greedy choice and its margin at each gen position."""
    ids = torch.tensor([prompt_ids + gen_ids])
    logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
    taken = logprobs.gather(1, ids[0, 1:, None])[:, 0]
    at_gen = logprobs[len(prompt_ids) - 1:]  # the rows that predict the generated tokens
    top2 = at_gen.topk(2, dim=-1).values
    n_prompt = len(prompt_ids) - 1
    return {"prompt_logprobs": taken[:n_prompt].tolist(), "gen_logprobs": taken[n_prompt:].tolist(),
            "greedy": at_gen.argmax(-1).tolist(), "margin": (top2[:, 0] - top2[:, 1]).tolist()}


def agreement(result: dict, ours: dict) -> dict:
    """Largest |logprob difference| (prompt and generated tokens) and how many generated tokens we also pick."""
    diffs = [abs(a - b) for key in ("prompt_logprobs", "gen_logprobs") for a, b in zip(result[key], ours[key])]
    equal = sum(a == b for a, b in zip(result["gen_ids"], ours["greedy"]))
    # A differing token is allowed only where our top-1 margin is within the tolerance: a near tie.
    contested = min([m for a, b, m in zip(result["gen_ids"], ours["greedy"], ours["margin"]) if a != b], default=0.0)
    return {"max_abs_logprob_diff": max(diffs), "tokens_equal": equal, "tokens": len(result["gen_ids"]),
            "largest_margin_of_a_differing_token": contested}


def assert_agrees(result: dict, ours_per_prompt: list[dict], tol: float) -> list[dict]:
    """Assert a job's result agrees with our scores of its prompts within `tol`; return the measurements."""
    assert result.get("error") is None, f"vLLM refused the folder: {result['error']}"
    measured = []
    for prompt, ours in zip(result["prompts"], ours_per_prompt, strict=True):
        numbers = agreement(prompt, ours)
        assert numbers["max_abs_logprob_diff"] <= tol, (numbers, prompt["text"])
        assert numbers["largest_margin_of_a_differing_token"] <= tol, (numbers, prompt["text"])
        measured.append(numbers)
    return measured


def compare_with_ours(model: torch.nn.Module, result: dict, tol: float) -> list[dict]:
    """`assert_agrees` for a job's result against `model` scoring the very same token ids."""
    assert result.get("error") is None, f"vLLM refused the folder: {result['error']}"
    ours = [our_scores(model, p["prompt_ids"], p["gen_ids"]) for p in result["prompts"]]
    return assert_agrees(result, ours, tol)
