"""Qwen2.5-Coder-0.5B-Instruct end to end: quantize, train, merge, export, and held-out perplexity in each engine.

The second real model (qwen2: q/k/v biases, an untied head; weights mostly on 5-8-bit grids, so 4 bits costs
it something, unlike SmolLM2, whose weights came from Q4_1). Text domain fit for a code model: Python's own
documentation as Debian ships it (tutorial + howto to train on, the FAQ held out). Group size 128: it divides
every projection (896 = 7 x 128, 4864 = 38 x 128), is what GPTQ and AWQ releases of Qwen use, and is a
multiple of 32, so the GGUF Q4_1 export maps it block for block.

Rows: the GPTQ base and the trained model (scales only, the CLI's default), merged file to file; each scored
in the engine that serves it: transformers + GPTQModel on the GPTQ folder, llama.cpp on the GGUF export,
vLLM (CPU build, `.venv-vllm`) on the AWQ export; the trained model unmerged in transformers as the reference.

    python benchmarks/qwen_coder.py            # ~30-60 min on 2 cores (quantizing ~10 min)
    python benchmarks/qwen_coder.py --quick    # 2 training steps, 4 windows: the pipeline in minutes

Writes results/qwen_coder.{json,md}; prints the table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from report import publish  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from peft_qalora.assets import cache_dir, python_docs_dir, qwen_coder_dir  # noqa: E402
from peft_qalora.training.data import token_windows  # noqa: E402
from peft_qalora.evaluate import perplexity  # noqa: E402
from peft_qalora.exports import export  # noqa: E402
from peft_qalora.merge.files import merge_checkpoint  # noqa: E402
from peft_qalora.base.quantize import QuantizeSettings, quantize_model  # noqa: E402
from peft_qalora.base.load import load_gptq_model, load_tokenizer  # noqa: E402
from peft_qalora.training.recipe import TrainSettings, train_adapter  # noqa: E402


@dataclass
class Budget:
    steps: int = 30
    batch_size: int = 4
    seq_len: int = 128
    eval_windows: int = 16
    calibration_windows: int = 32
    group_size: int = 128
    learning_rate: float = 2e-4


def texts() -> tuple[list[str], list[str]]:
    """(train, held out): tutorial + howto, and the FAQ."""
    docs = python_docs_dir()
    read = lambda section: [p.read_text(errors="replace") for p in sorted((docs / section).glob("*.rst.txt"))]  # noqa: E731
    return read("tutorial") + read("howto"), read("faq")


def llama_cpp_perplexity(path: Path, windows: torch.Tensor) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=windows.shape[1],
                          n_batch=windows.shape[1], n_threads=2, seed=0)
    nll, count = 0.0, 0
    try:
        for row in windows:
            llm.reset()
            llm.eval(row.tolist())
            logits = torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32))
            logprobs = torch.log_softmax(logits[:-1], -1).gather(-1, row[1:, None])[:, 0]
            nll, count = nll - float(logprobs.sum()), count + len(row) - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def vllm_perplexities(folders: list[Path], windows: torch.Tensor) -> list[float | str]:
    """Perplexity of each folder served by vLLM (prompt log-probabilities, fp16), or vLLM's error."""
    from helpers.serving_compare import run_vllm, vllm_job

    jobs = [vllm_job(f, [w.tolist() for w in windows], max_tokens=1) for f in folders]
    out = []
    for result in run_vllm(jobs, timeout=3600)["results"]:
        if result.get("error"):
            out.append(result["error"].splitlines()[0][:200])
            continue
        logprobs = [lp for p in result["prompts"] for lp in p["prompt_logprobs"]]
        out.append(math.exp(-sum(logprobs) / len(logprobs)))
    return out


def transformers_perplexity(folder_or_model, windows: torch.Tensor) -> float:
    model = load_gptq_model(folder_or_model) if isinstance(folder_or_model, Path) else folder_or_model
    with torch.no_grad():
        return perplexity(model.eval(), windows, progress=False)


def float_perplexity(model_dir: Path, windows: torch.Tensor) -> float:
    """The unquantized model (what 4 bits cost it), in float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        return perplexity(model.eval(), windows, progress=False)


def run(budget: Budget, work: Path, reuse: bool = False) -> dict:
    timings, rows = {}, {}
    tick = time.perf_counter()
    model_dir, (train_texts, heldout_texts) = qwen_coder_dir(), texts()
    tokenizer = load_tokenizer(model_dir, "qwen_coder")
    train_windows = token_windows(tokenizer, train_texts, budget.seq_len,
                                  max_windows=budget.steps * budget.batch_size)
    eval_windows = token_windows(tokenizer, heldout_texts, budget.seq_len, max_windows=budget.eval_windows)
    timings["assets"] = time.perf_counter() - tick

    base = work / f"gptq-4b-g{budget.group_size}-calib{budget.calibration_windows}"
    tick = time.perf_counter()
    if not base.is_dir():
        quantize_model(model_dir, base, QuantizeSettings(bits=4, group_size=budget.group_size,
                                                          calibration_windows=budget.calibration_windows),
                       calibration_texts=train_texts)
    timings["quantize"] = time.perf_counter() - tick

    adapter, merged = work / f"adapter-{budget.steps}", work / "merged"
    tick = time.perf_counter()
    if reuse and adapter.is_dir():  # the adapter of an earlier run with this budget: score it, do not train again
        from peft import PeftModel

        trained = {"model": PeftModel.from_pretrained(load_gptq_model(base), str(adapter)), "train_loss": None}
    else:
        trained = train_adapter(base, train_windows, adapter, TrainSettings(
            steps=budget.steps, batch_size=budget.batch_size, learning_rate=budget.learning_rate, scales_only=True),
            overwrite=True)
    timings["train"] = time.perf_counter() - tick
    rows["trained, unmerged (transformers)"] = transformers_perplexity(trained.pop("model"), eval_windows)
    rows["float base, 16-bit (transformers, reference)"] = float_perplexity(model_dir, eval_windows)
    tick = time.perf_counter()
    merge_checkpoint(base, adapter, merged, overwrite=True, progress=False)
    for name, src in (("base", base), ("merged", merged)):
        export(src, work / f"{name}-awq", "awq", overwrite=True, progress=False)
        export(src, work / f"{name}.gguf", "gguf", overwrite=True, progress=False)
    timings["merge_and_export"] = time.perf_counter() - tick

    tick = time.perf_counter()
    for name, src in (("GPTQ base", base), ("merged", merged)):
        rows[f"{name} (transformers, GPTQ folder)"] = transformers_perplexity(src, eval_windows)
    for name in ("base", "merged"):
        rows[f"{'GPTQ base' if name == 'base' else 'merged'} (llama.cpp, GGUF Q4_1)"] = llama_cpp_perplexity(
            work / f"{name}.gguf", eval_windows)
    for name, value in zip(("GPTQ base", "merged"), vllm_perplexities([work / "base-awq", work / "merged-awq"],
                                                                          eval_windows)):
        rows[f"{name} (vLLM, AWQ)"] = value
    timings["evaluate"] = time.perf_counter() - tick
    sizes = {"gguf_bytes": (work / "merged.gguf").stat().st_size,
             "awq_bytes": sum(p.stat().st_size for p in (work / "merged-awq").glob("*.safetensors"))}
    return {"budget": asdict(budget), "perplexity": rows, "trained_loss": trained["train_loss"], **sizes,
            "seconds": {k: round(v, 1) for k, v in timings.items()}, "eval_tokens": int(eval_windows.numel())}


def markdown(summary: dict) -> str:
    b = summary["budget"]
    lines = [f"Qwen2.5-Coder-0.5B-Instruct, GPTQ 4-bit g{b['group_size']} (GPTQModel), scales only, {b['steps']} "
             f"steps x {b['batch_size']} x {b['seq_len']} tokens of the Python tutorial + howto; held-out perplexity "
             f"on {summary['eval_tokens']} tokens of the Python FAQ.", "",
             "| row (engine, format) | perplexity |", "|---|---|"]
    for name, value in summary["perplexity"].items():
        lines.append(f"| {name} | {value:.3f} |" if isinstance(value, float) else f"| {name} | {value} |")
    lines += ["", f"Files: GGUF {summary['gguf_bytes'] / 1e6:.1f} MB, AWQ {summary['awq_bytes'] / 1e6:.1f} MB. "
              f"Seconds: {summary['seconds']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="score the adapter an earlier run with this budget trained")
    args = parser.parse_args()
    budget = Budget(steps=2, eval_windows=4, calibration_windows=8) if args.quick else Budget()
    work = cache_dir() / "bench-qwen-coder"
    work.mkdir(parents=True, exist_ok=True)
    summary = run(budget, work, args.reuse)
    publish("qwen_coder-quick" if args.quick else "qwen_coder", summary, markdown(summary))


if __name__ == "__main__":
    main()
