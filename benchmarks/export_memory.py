"""Peak memory of every export and merge at 70B's sizes: one LLaMA-70B-shaped block with 70B's full embeddings.

Question: do the commands stay under 2 GB of peak RSS whatever the model's size, as the 7B-shaped slice of
`export_speed.py` suggests? Memory follows the largest tensors, not the count of layers, so one block of the 70B
shape (hidden 8192, MLP 28672: a 117 MB MLP qweight) with both of 70B's fp16 embedding tables (128256 x 8192,
2.1 GB each) holds every tensor size a 70B model has: 4.4 GB on disk, `merge_speed.py`'s generator. Each command
runs once under GNU time (%M: peak RSS of it and the children it waited for, the GGUF converter's included).

    python benchmarks/export_memory.py [--keep]      # ~12 GB free, ~3 min

Writes results/export_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from export_speed import OPERATIONS, command, prepare
from merge_speed import LLAMA_70B, timed
from report import publish, scratch


BLOCK_70B = dict(LLAMA_70B, layers=1)
LIMIT_MB = 2048


def run(work: Path) -> dict:
    base, adapter = prepare(work, "llama70b-1block", BLOCK_70B)
    os.sync()
    results = {}
    for op in OPERATIONS:
        if op == "cp":
            continue
        cmd, out = command(op, base, adapter, work / "out")
        result = timed(cmd, out, dict(os.environ))
        shutil.rmtree(out) if out.is_dir() else out.unlink()
        results[op] = {"seconds": result["seconds_synced"], "peak_rss_mb": result["peak_rss_mb"]}
        print(f"{op}: {results[op]}", file=sys.stderr)
    return {"checkpoint_gb": sum(p.stat().st_size for p in base.iterdir()) / 1e9, "shape": BLOCK_70B,
            "operations": results,
            "under_2gb": {op: r["peak_rss_mb"] < LIMIT_MB for op, r in results.items()}}


def markdown(s: dict) -> str:
    lines = [f"Peak RSS at 70B's tensor sizes: one LLaMA-70B-shaped 4-bit g32 block with 70B's fp16 embedding and "
             f"output head ({s['checkpoint_gb']:.1f} GB), r=64 adapter for the merges; one run each, GNU time %M "
             "(children included).", "", "| command | s | peak RSS MB | under 2 GB |", "|---|---|---|---|"]
    for op, r in s["operations"].items():
        lines.append(f"| `{op}` | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{'yes' if s['under_2gb'][op] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = parser.parse_args()
    with scratch("bench-70b", 12, args.keep) as work:
        summary = run(work)
    publish("export_memory", summary, markdown(summary))


if __name__ == "__main__":
    main()
