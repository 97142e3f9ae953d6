"""Run real vLLM (CPU build) on checkpoint folders; run with the vLLM venv's python, never imported.

    .venv-vllm/bin/python tests/helpers/vllm_runner.py JOBS.json

JOBS.json holds a list of jobs, each
    {"model": DIR, "prompts": [str or [token ids], ...], "max_tokens": 32, "dtype": "float16",
     "lora": null or DIR, "max_lora_rank": 16, "max_model_len": 512, "expect_error": false}
(only "model" and "prompts" are required; the values shown are the defaults).
Output: stdout carries exactly one line, the JSON document
    {"reference_gemm": bool, "vllm_version": str, "results": [per job, in order]}
where a job's result is {"error": "ExceptionType: message"} if vLLM refused to build the engine
(a job with "expect_error": true skips printing that traceback), else
    {"error": null, "seconds": float, "prompts": [{"prompt_ids", "prompt_logprobs", "gen_ids",
     "gen_logprobs", "text"}]}
`prompt_logprobs[i]` is vLLM's log-probability of `prompt_ids[i + 1]`; `gen_logprobs[i]` that of
`gen_ids[i]`. Generation is greedy and ignores EOS, so every prompt gets `max_tokens` tokens. A failure
after the engine is built (during generation) is not a refusal: the runner exits non-zero.

Throughput mode (benchmarks/serving_engines.py): a job with `"throughput": {"repeats": 3}` runs the prompts as
one batch, prefix caching off, without log-probabilities: one warm-up, then per repeat the batch with
`max_tokens=1` (prefill) and with `max_tokens` (prefill + decode), timed. Its result is
    {"error": null, "seconds": float, "throughput": {"prefill_s": [...], "full_s": [...],
     "prompt_tokens": int, "generated_tokens": int}}
Everything vLLM prints, from Python or C++, goes to stderr.

"reference_gemm" says whether `_C::cpu_gemm_wna16` is tests/helpers/vllm_reference_gemm.py's reference:
registered when the loaded vLLM library lacks the op (AVX2-only CPUs), or everywhere with the
environment variable VLLM_RUNNER_REFERENCE_GEMM=force.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the reference op must be in it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default would take much more
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine(job: dict):
    from vllm import LLM

    # a throughput job repeats its prompts: a prefix cache would skip their prefill from the second time on
    options = {"enable_prefix_caching": False} if job.get("throughput") else {}
    return LLM(model=job["model"], dtype=job.get("dtype", "float16"), enforce_eager=True,
               distributed_executor_backend="uni", enable_lora=bool(job.get("lora")),
               max_lora_rank=job.get("max_lora_rank", 16), max_model_len=job.get("max_model_len", 512),
               seed=0, **options)


def as_prompt(prompt):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(prompt)) if isinstance(prompt, list) else prompt


def chosen(logprobs: list, token_ids: list[int]) -> list[float]:
    """The log-probability vLLM gave each token actually in the sequence."""
    return [position[token].logprob for position, token in zip(logprobs, token_ids)]


def generate(llm, job: dict) -> list[dict]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 32), prompt_logprobs=0,
                            logprobs=1, ignore_eos=True)
    lora = LoRARequest("mine", 1, job["lora"]) if job.get("lora") else None
    prompts = [as_prompt(p) for p in job["prompts"]]
    # vLLM 0.32's CPU LoRA logits path breaks on a batch of several prompts with prompt_logprobs
    # (punica_cpu bgmv_shrink: "einsum(): subscript b has size 5 ... with previously seen size 4"); one
    # prompt a call works, and greedy decoding of a prompt does not depend on its batch-mates.
    batches = [[p] for p in prompts] if lora else [prompts]
    outputs = [o for b in batches for o in llm.generate(b, params, lora_request=lora, use_tqdm=False)]
    results = []
    for out in outputs:
        completion = out.outputs[0]
        gen_ids = list(completion.token_ids)
        results.append({"prompt_ids": list(out.prompt_token_ids),
                        "prompt_logprobs": chosen(out.prompt_logprobs[1:], out.prompt_token_ids[1:]),
                        "gen_ids": gen_ids, "gen_logprobs": chosen(completion.logprobs, gen_ids),
                        "text": completion.text})
    return results


def throughput(llm, job: dict) -> dict:
    """Wall seconds of the prompts as one batch: prefill alone (max_tokens=1) and prefill + decode, per repeat."""
    from vllm import SamplingParams

    prompts = [as_prompt(p) for p in job["prompts"]]
    new_tokens = job.get("max_tokens", 32)

    def timed(max_tokens: int) -> tuple[float, list]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, outputs

    _, outputs = timed(new_tokens)  # warm-up
    prefill, full = [], []
    for _ in range(job["throughput"].get("repeats", 3)):
        prefill.append(timed(1)[0])
        full.append(timed(new_tokens)[0])
    return {"prefill_s": prefill, "full_s": full, "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def run_job(job: dict) -> dict:
    start = time.time()
    try:
        llm = engine(job)
    except Exception as exc:  # a refused folder is a result the tests assert on, not a crash
        if not job.get("expect_error"):
            traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        if job.get("throughput"):
            return {"error": None, "throughput": throughput(llm, job), "seconds": round(time.time() - start, 1)}
        return {"error": None, "prompts": generate(llm, job), "seconds": round(time.time() - start, 1)}
    finally:
        del llm  # two engines' KV caches would not fit side by side
        gc.collect()


def main(jobs_file: str) -> dict:
    import torch
    import vllm
    import vllm._custom_ops  # noqa: F401  loads vLLM's compiled ops (_C_AVX2 or _C_AVX512)

    import vllm_reference_gemm  # sibling file: this script's folder is on sys.path

    torch.manual_seed(0)
    reference = vllm_reference_gemm.install(force=os.environ.get("VLLM_RUNNER_REFERENCE_GEMM") == "force")
    jobs = json.loads(open(jobs_file).read())
    return {"reference_gemm": reference, "vllm_version": vllm.__version__, "results": [run_job(j) for j in jobs]}


if __name__ == "__main__":
    # vLLM and its C++ code print to fd 1; keep the real stdout for the JSON line alone.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    document = main(sys.argv[1])
    stdout.write(json.dumps(document) + "\n")
    stdout.flush()
