"""How every benchmark ends: results/<name>.json and .md, the table printed, then one JSON line."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, summary: dict, table: str, folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / f"{name}.md").write_text(table)
    print(table)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


@contextlib.contextmanager
def scratch(name: str, needs_gb: float, keep: bool = False) -> Iterator[Path]:
    """`$PEFT_QALORA_CACHE/<name>/` for a benchmark's generated checkpoints: refused (exit) with less than `needs_gb`
    free, removed at the end unless `keep`."""
    from peft_qalora.assets import cache_dir

    work = cache_dir() / name
    work.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(work).free / 1e9
    if free_gb < needs_gb:
        sys.exit(f"{name}: only {free_gb:.1f} GB free; the benchmark needs ~{needs_gb:.0f} GB.")
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
