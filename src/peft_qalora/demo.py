"""`make demo`: fine-tune SmolLM2-135M-Instruct (4-bit GPTQ) on a task and show what the served model answers.

The user's path on a real model, offline, in minutes on 2 CPU cores: quantize (once, cached), write the task as
chat JSONL, train the default (scales only) on it with a validation loss, merge into the GPTQ folder, export GGUF,
then answer held-out prompts in llama.cpp with the base and with the fine-tuned file: a before / after table and
exact match on both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .assets import cache_dir, smollm2_dir
from .exports.gguf import describe_gguf, export_gguf
from .merge.files import describe_merge, merge_checkpoint
from .tasks import TASKS, answers_llamacpp, exact_match, make_items, write_jsonl
from .training.recipe import TrainSettings, train_adapter


@dataclass
class DemoSettings:
    steps: int = 24
    """Optimizer steps (batch_size chats each)."""
    batch_size: int = 8
    """Chats per optimizer step."""
    learning_rate: float = 1e-3
    """AdamW learning rate (benchmarks/tasks.py's sweep: best for scales only on this task)."""
    n_test: int = 40
    """Held-out prompts answered in llama.cpp, before and after."""
    n_valid: int = 16
    """Validation chats (their loss every 8 steps)."""
    shown: int = 6
    """Rows of the before / after table."""
    bits: int = 4
    """GPTQ bit width."""
    group_size: int = 32
    """GPTQ group size (576 = 18 x 32)."""
    task: str = "dates"
    """`dates` (any human date -> YYYY-MM-DD) or `numbers` (needs num2words)."""

    def __post_init__(self):  # refused here, not after minutes of quantizing
        if self.task not in TASKS:
            raise ValueError(f"demo: task={self.task!r}; choose one of {', '.join(TASKS)}.")
        for name in ("steps", "batch_size", "n_test", "n_valid"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo: {name}={getattr(self, name)}; use a positive number.")


def run_demo(settings: DemoSettings, echo=lambda line: None, model_dir: Path | None = None,
             work: Path | None = None) -> dict:
    """Run the demo; `echo` receives the progress lines and the final table (the CLI prints them).

    `model_dir` (default SmolLM2-135M-Instruct) and `work` (default the cache's `demo/`) are for tests."""
    from transformers import AutoTokenizer

    from .base.quantize import QuantizeSettings, quantize_model
    from .training.instruction import load_instruction_data, pad_collator

    timings, work = {}, Path(work or cache_dir() / "demo")
    work.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    model_dir = Path(model_dir or smollm2_dir())
    base = work / f"gptq-{settings.bits}b-g{settings.group_size}"
    if not base.is_dir():
        echo(f"[1/5] quantizing {model_dir.name} to {settings.bits}-bit group {settings.group_size} (once) ...")
        quantize_model(model_dir, base, QuantizeSettings(bits=settings.bits, group_size=settings.group_size))
    else:
        echo(f"[1/5] reusing the quantized model in {base}")
    timings["quantize"] = time.perf_counter() - tick

    tokenizer = AutoTokenizer.from_pretrained(base)
    items = make_items(settings.task, settings.steps * settings.batch_size, settings.n_test, settings.n_valid)
    data = work / "data"
    data.mkdir(exist_ok=True)
    train_file, valid_file = write_jsonl(items["train"], data / "train.jsonl"), write_jsonl(items["val"],
                                                                                           data / "valid.jsonl")
    train, valid = (load_instruction_data(f, tokenizer, 128) for f in (train_file, valid_file))
    echo(f"[2/5] training the scales (the default) on {train.rows} `{settings.task}` chats from {train_file} "
         f"({settings.steps} steps of {settings.batch_size}, loss on the answers only) ...")
    adapter = work / "adapter"
    trained = train_adapter(base, train.dataset, adapter, TrainSettings(
        steps=settings.steps, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        eval_steps=8), overwrite=True, eval_dataset=valid.dataset, data_collator=pad_collator(tokenizer), echo=echo)
    trained.pop("model")
    timings["train"] = trained["seconds"]

    echo("[3/5] merging into the GPTQ folder (file to file) ...")
    tick = time.perf_counter()
    report = merge_checkpoint(base, adapter, work / "merged", overwrite=True, progress=False)
    echo(describe_merge(report))
    timings["merge"] = time.perf_counter() - tick

    echo("[4/5] exporting the base and the merged model to GGUF for llama.cpp ...")
    tick = time.perf_counter()
    files = {"base": work / "base.gguf", "fine-tuned": work / "merged.gguf"}
    for name, src in (("base", base), ("fine-tuned", work / "merged")):
        echo(describe_gguf(export_gguf(src, files[name], overwrite=True, progress=False)))
    timings["export"] = time.perf_counter() - tick

    echo(f"[5/5] answering {settings.n_test} held-out prompts in llama.cpp, before and after ...")
    tick = time.perf_counter()
    answers = {name: answers_llamacpp(path, tokenizer, items["test"]) for name, path in files.items()}
    timings["answer"] = time.perf_counter() - tick
    scores = {name: exact_match(items["test"], a) for name, a in answers.items()}
    echo(before_after(items["test"], answers, scores, settings))
    echo(f"training: {trained['trainable_parameters']:,} trainable parameters, final loss {trained['train_loss']:.3f}"
         + (f", best validation loss {trained['best_valid_loss']:.3f} at step {trained['best_step']}"
            if "best_step" in trained else "") + f", {trained['seconds_per_step']:.1f} s/step")
    echo("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    echo(f"\nserve it:  llama-server -m {files['fine-tuned'].resolve()}")
    return {"exact_match": scores, "answers": answers, "items": items["test"], "files": files, "train": trained,
            "merge": report["total"], "timings": timings}


def before_after(items: list[dict], answers: dict[str, list[str]], scores: dict[str, float],
                 settings: DemoSettings) -> str:
    """A Markdown table of the first `shown` held-out prompts, then exact match before and after."""
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")[:40]  # noqa: E731
    lines = ["", f"Held-out `{settings.task}` prompts, greedy, served by llama.cpp from the GGUF files:", "",
             "| input | expected | before (base) | after (fine-tuned) |", "|---|---|---|---|"]
    for i, item in enumerate(items[: settings.shown]):
        given = item["prompt"].split("\n", 1)[-1]
        lines.append(f"| {cell(given)} | {item['answer']} | {cell(answers['base'][i])} | "
                     f"{cell(answers['fine-tuned'][i])} |")
    lines += ["", f"exact match on {len(items)} held-out prompts: before {100 * scores['base']:.0f}%, "
              f"after {100 * scores['fine-tuned']:.0f}%"]
    return "\n".join(lines)
