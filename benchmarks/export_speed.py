"""Export and merge-and-export throughput on a LLaMA-7B-shaped 4-bit g32 GPTQ slice, against `cp -r`.

Question: do `peft-qalora export --format awq | compressed-tensors | gguf` and `peft-qalora merge --format ...`
run within 2x of copying the same files, with peak RSS under 2 GB whatever the model size?
The slice is `merge_speed.py`'s generator (same tensors, seed and shards) cut to 8 of LLaMA-7B's 32 blocks
(hidden 4096, MLP 11008, vocab 32000): 1.46 GB in 3 shards, every per-layer cost of the full model and both
fp16 embedding tables, small enough that 8 operations x 2 rounds run in ~10 min on 2 cores and fit a few GB
of disk. A 300-piece sentencepiece tokenizer is added for llama.cpp's converter (it pads the vocabulary to
32000). Every command runs as a subprocess under GNU time (%M: peak RSS of it and the children it waited for,
the GGUF converter's included), rounds alternate, medians are reported; cp is timed until `sync` of what it
wrote, our commands fsync their output before they return (`utils/atomic.py`).
The 70B figure: each command also runs, in every round, on a one-block toy of the same generator (hidden
256), whose time is the fixed cost (interpreter, imports, configs, converter start); the rest of the slice's
time, per byte, is scaled to a 70B model's bytes (merge_speed's 70B shape) and the fixed cost added back.

    python benchmarks/export_speed.py [--rounds 2] [--label after] [--src DIR] [--keep]   # ~5 GB free

`--src` runs the commands from another checkout's `src/` (the 'before' column); each `--label` is kept in
results/export_speed.{json,md}, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from merge_speed import LLAMA_7B, LLAMA_70B, model_bytes, timed, write_adapter, write_base
from report import RESULTS, publish, scratch


SLICE = dict(LLAMA_7B, layers=8)
TOY = {"hidden": 256, "mlp": 512, "layers": 1, "kv": 256, "vocab": 1000}
OPERATIONS = {  # name -> arguments after `python -m peft_qalora.cli`; OUT ends with .gguf for GGUF
    "cp": None,
    "export awq": ["export", "{base}", "{out}", "--format", "awq"],
    "export compressed-tensors": ["export", "{base}", "{out}", "--format", "compressed-tensors"],
    "export gguf": ["export", "{base}", "{out}.gguf", "--format", "gguf"],
    "merge (gptq)": ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{out}"],
    "merge --format awq": ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{out}", "--format", "awq"],
    "merge --format compressed-tensors": ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{out}",
                                          "--format", "compressed-tensors"],
    "merge --format gguf": ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{out}.gguf",
                            "--format", "gguf"],
}


def tiny_tokenizer() -> bytes:
    """A 300-piece sentencepiece model trained on generated words (what tests/conftest.py's tiny_spm is)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(12))
                                                          for _ in range(2000)),
                                   model_writer=model, vocab_size=300, model_type="bpe", minloglevel=2)
    return model.getvalue()


def prepare(work: Path, name: str, shape: dict) -> tuple[Path, Path]:
    base, adapter = work / f"{name}-gptq-4b-g32", work / f"{name}-adapter-r64"
    if not base.is_dir():
        write_base(base, shape)
        (base / "tokenizer.model").write_bytes(tiny_tokenizer())
    if not adapter.is_dir():
        write_adapter(adapter, shape)
    return base, adapter


def command(op: str, base: Path, adapter: Path, out: Path) -> tuple[list[str], Path]:
    if OPERATIONS[op] is None:
        return ["cp", "-r", str(base), str(out)], out
    args = [a.format(base=base, adapter=adapter, out=out) for a in OPERATIONS[op]]
    return [sys.executable, "-m", "peft_qalora.cli", *args], Path(args[args.index("--out") + 1] if "--out" in args
                                                                 else args[2])


def run(work: Path, rounds: int, src: Path) -> dict:
    base, adapter = prepare(work, "llama7b-slice", SLICE)
    toy, toy_adapter = prepare(work, "toy", TOY)
    os.sync()  # the generated files' write-back would otherwise land inside the first round's cp
    env = dict(os.environ, PYTHONPATH=str(src))
    runs: dict[str, list] = {op: [] for op in OPERATIONS}
    for r in range(rounds):
        for op in OPERATIONS:
            cmd, out = command(op, base, adapter, work / "out")
            result = timed(cmd, out, env)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
            cmd, out = command(op, toy, toy_adapter, work / "out")
            result["toy_seconds"] = timed(cmd, out, env)["seconds_synced"]
            shutil.rmtree(out) if out.is_dir() else out.unlink()
            runs[op].append({k: v for k, v in result.items() if k != "stdout"})
            print(f"round {r} {op}: {runs[op][-1]}", file=sys.stderr)
    return summarize(runs, base)


def summarize(runs: dict, base: Path) -> dict:
    med = lambda op, key: statistics.median(r[key] for r in runs[op])  # noqa: E731
    size, scale = sum(p.stat().st_size for p in base.iterdir()), model_bytes(LLAMA_70B) / model_bytes(SLICE)
    cp_s = med("cp", "seconds_synced")
    ops = {}
    for op in OPERATIONS:
        seconds, fixed = med(op, "seconds_synced"), med(op, "toy_seconds")
        est_70b = cp_s * scale if op == "cp" else fixed + max(seconds - fixed, 0) * scale
        ops[op] = {"seconds": seconds, "x_cp": seconds / cp_s, "fixed_s": fixed, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[op]),
                   "est_70b_s": est_70b, "est_70b_x_cp": est_70b / (cp_s * scale)}
    return {"runs": runs, "rounds": len(runs["cp"]), "checkpoint_gb": size / 1e9, "layers": SLICE["layers"],
            "gb_70b": model_bytes(LLAMA_70B) / 1e9, "operations": ops,
            "targets": {op: {"within_2x_of_cp": o["x_cp"] <= 2, "peak_under_2gb": o["peak_rss_mb"] < 2048}
                        for op, o in ops.items() if op != "cp"}}


def markdown(results: dict) -> str:
    labels = list(results["labels"])
    results, first = results["labels"], results["labels"][labels[0]]
    head = (f"Exports of a LLaMA-7B-shaped 4-bit g32 GPTQ slice ({first['layers']} of 32 blocks, "
            f"{first['checkpoint_gb']:.2f} GB with both fp16 embedding tables), r=64 adapter on every projection for "
            f"the merges; median of {first['rounds']} alternating rounds, cp timed to `sync`, our commands "
            "fsync their output. Peak RSS: GNU time %M (the GGUF converter's child process included).")
    cols = " | ".join(f"{label}: s | x cp | peak RSS MB | 70B est. x cp" for label in labels)
    lines = [head, "", f"| operation | {cols} |", "|---|" + "---|" * (4 * len(labels))]
    for op in OPERATIONS:
        cells = []
        for label in labels:
            o = results[label]["operations"].get(op)
            rss = "-" if op == "cp" or o is None else f"{o['peak_rss_mb']:.0f}"
            cells.append("- | - | - | -" if o is None else
                         f"{o['seconds']:.1f} | {o['x_cp']:.2f} | {rss} | {o['est_70b_x_cp']:.2f}")
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    last = results[labels[-1]]
    older = [label for label in labels if "fixed_s" not in results[label]["operations"]["export awq"]]
    if older:
        lines += ["", f"{', '.join(older)}: the 70B column scaled the seconds each command printed for its own work "
                  "(an earlier version of this script), not the slice minus the toy run."]
    lines += ["", f"70B ({last['gb_70b']:.0f} GB) extrapolated, {labels[-1]}: " + ", ".join(
        f"{op} {o['est_70b_s'] / 60:.1f} min" for op, o in last["operations"].items()) + ".",
        f"Targets ({labels[-1]}): " + "; ".join(
            f"{op}: 2x {'yes' if t['within_2x_of_cp'] else 'NO'}, <2 GB {'yes' if t['peak_under_2gb'] else 'NO'}"
            for op, t in last["targets"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--label", default="after", help="the column these runs fill in results/export_speed.*")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the src/ folder whose peft_qalora the commands run")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint and adapter")
    args = parser.parse_args()
    with scratch("bench-export", 5, args.keep) as work:
        summary = run(work, args.rounds, args.src.resolve())
    previous = RESULTS / "export_speed.json"
    results = json.loads(previous.read_text()) if previous.is_file() else {"labels": {}, "runs": {}}
    results["runs"][args.label] = summary.pop("runs")
    results["labels"][args.label] = summary
    publish("export_speed", results, markdown(results))


if __name__ == "__main__":
    main()
