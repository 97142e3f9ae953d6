"""Where an export's time goes, stage by stage, on `export_speed.py`'s 7B-shaped slice: the gap to `cp` explained.

Question: `export_speed.py` times whole commands; which part of an export costs what, per byte, against `cp`?
In one process and on one thread (so stages add up), over every quantized linear of the slice:
- `read`: its GPTQ tensors read from the (cached) files into memory (`stream.read_layer`: preadv);
- `convert`: the format's conversion of what was read (AWQ, compressed-tensors; GGUF: `q4_1_terms` and the Q4_1
  rows, what the child process converts);
- `write`: the converted bytes written to one file (pwrite, the exports' `ShardWriter` call), then `fsync`;
- `copy the rest`: every other tensor (embeddings, norms) copied file to file by the kernel (copy_file_range);
- the fixed cost: `python -c "import torch"` and, for GGUF, the converter child's imports (`conversion`), each a
  fresh interpreter.
`cp -r` of the slice, timed to `sync`, is the yardstick. Rounds alternate; medians are reported.

    python benchmarks/export_profile.py [--rounds 3] [--keep]   # generates export_speed's slice: ~4 GB free, ~3 min

Writes results/export_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from export_speed import SLICE, prepare
from report import publish, scratch

from peft_qalora.exports.awq import AWQFormat
from peft_qalora.exports import format_named
from peft_qalora.exports.gguf.q4_1 import q4_1_blocks_packed, q4_1_terms
from peft_qalora.exports.stream import plan_export, read_layer
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.streaming import ShardWriter

FORMATS = ("awq", "compressed-tensors", "gguf")


def gguf_convert(name, tensors) -> dict:
    terms = q4_1_terms(tensors, None, name)
    return {"blocks": q4_1_blocks_packed(tensors.qweight, terms.d, terms.m)}


def converter_for(fmt: str, layers) -> callable:
    if fmt == "gguf":
        return gguf_convert
    fmt = format_named(fmt)
    fmt.plan(layers)
    return fmt.convert


def as_bytes(tensor) -> memoryview:
    array = tensor if isinstance(tensor, np.ndarray) else tensor.contiguous().view(-1).view(torch.uint8).numpy()
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def stages(base: Path, fmt: str, out: Path) -> dict:
    """Seconds of each stage of one format's export of `base`, on this thread."""
    quant, reader, layers = plan_export(base, AWQFormat())  # the slice is 4-bit g32: every format takes it
    bits, zero_format = int(quant["bits"]), ckpt.zero_format_of(quant)
    convert, times = converter_for(fmt, layers), {"read": 0.0, "convert": 0.0, "write": 0.0}
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    at, quantized = 0, 0
    try:
        for layer in layers:
            t0 = time.perf_counter()
            tensors = read_layer(reader, layer.name, bits, zero_format)
            t1 = time.perf_counter()
            converted = convert(layer.name, tensors)
            t2 = time.perf_counter()
            for tensor in converted.values():
                data = as_bytes(tensor)
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], at + done)
                at += len(data)
            times["read"] += t1 - t0
            times["convert"] += t2 - t1
            times["write"] += time.perf_counter() - t2
            quantized += sum(reader.entries[f"{layer.name}.{s}"].end - reader.entries[f"{layer.name}.{s}"].start
                             for s in ("qweight", "qzeros", "scales", "g_idx"))
        t = time.perf_counter()
        os.fsync(fd)
        times["fsync"] = time.perf_counter() - t
    finally:
        os.close(fd)
    rest = [k for k in reader.key_to_shard if k.rpartition(".")[0] not in {l.name for l in layers}]
    specs = {k: (reader.entries[k].dtype, reader.entries[k].shape) for k in rest}
    t = time.perf_counter()
    with ShardWriter(out.with_suffix(".rest"), specs) as writer:
        for key in rest:
            writer.copy(key, reader.entries[key])
    fd = os.open(out.with_suffix(".rest"), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    times["copy the rest"] = time.perf_counter() - t
    out.unlink()
    out.with_suffix(".rest").unlink()
    return dict(times, quantized_bytes=quantized, written_bytes=at, rest_bytes=sum(
        reader.entries[k].end - reader.entries[k].start for k in rest))


def fresh_interpreter(code: str, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - start


def converter_imports() -> str:
    """Code importing what llama.cpp's converter imports in the GGUF child (its `conversion` package)."""
    from peft_qalora.exports.gguf.llamacpp import child_path, converter_dir

    return f"import sys; sys.path[:0] = {child_path(converter_dir())!r}; import torch, gguf, conversion"


def run(work: Path, rounds: int) -> dict:
    base, _ = prepare(work, "llama7b-slice", SLICE)
    os.sync()
    runs: dict[str, list] = {"cp": [], "python + torch": [], "gguf converter imports": []}
    runs.update({fmt: [] for fmt in FORMATS})
    gguf_code = converter_imports()
    for r in range(rounds):
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(base), str(work / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        runs["cp"].append(time.perf_counter() - start)
        shutil.rmtree(work / "copy")
        runs["python + torch"].append(fresh_interpreter("import torch"))
        runs["gguf converter imports"].append(fresh_interpreter(gguf_code))
        for fmt in FORMATS:
            runs[fmt].append(stages(base, fmt, work / "out.bin"))
            print(f"round {r} {fmt}: {runs[fmt][-1]}", file=sys.stderr)
    med = statistics.median
    summary = {"rounds": rounds, "checkpoint_gb": sum(p.stat().st_size for p in base.iterdir()) / 1e9,
               "cp_s": med(runs["cp"]), "python_torch_s": med(runs["python + torch"]),
               "gguf_converter_imports_s": med(runs["gguf converter imports"]), "formats": {}}
    for fmt in FORMATS:
        keys = [k for k in runs[fmt][0] if not k.endswith("bytes")]
        summary["formats"][fmt] = {k: med(r[k] for r in runs[fmt]) for k in keys}
        summary["formats"][fmt].update({k: v for k, v in runs[fmt][0].items() if k.endswith("bytes")})
    summary["runs"] = runs
    return summary


def markdown(s: dict) -> str:
    cp = s["cp_s"]
    stage_names = ["read", "convert", "write", "fsync", "copy the rest"]
    lines = [f"Stages of an export of the 7B-shaped slice ({s['checkpoint_gb']:.2f} GB), one thread, median of "
             f"{s['rounds']} rounds; `cp -r` + `sync` of the slice: {cp:.2f} s. Seconds (x cp).", "",
             "| format | " + " | ".join(stage_names) + " | sum of stages | + fixed cost |",
             "|---|" + "---|" * (len(stage_names) + 2)]
    for fmt, t in s["formats"].items():
        total = sum(t[k] for k in stage_names)
        fixed = s["python_torch_s"] + (s["gguf_converter_imports_s"] if fmt == "gguf" else 0)
        lines.append(f"| {fmt} | " + " | ".join(f"{t[k]:.2f} ({t[k] / cp:.2f})" for k in stage_names)
                     + f" | {total:.2f} ({total / cp:.2f}) | {fixed:.2f} |")
    t = s["formats"]["awq"]
    lines += ["", f"Quantized linears: {t['quantized_bytes'] / 1e9:.2f} GB read; other tensors: "
              f"{t['rest_bytes'] / 1e9:.2f} GB copied by the kernel. Fixed cost, a fresh interpreter each: "
              f"`import torch` {s['python_torch_s']:.2f} s; llama.cpp's converter imports (GGUF's child) "
              f"{s['gguf_converter_imports_s']:.2f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated slice (export_speed.py reuses it)")
    args = parser.parse_args()
    with scratch("bench-export", 4, args.keep) as work:
        summary = run(work, args.rounds)
    publish("export_profile", summary, markdown(summary))


if __name__ == "__main__":
    main()
