"""How every benchmark ends: results/<name>.json and .md, the table printed, then one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, summary: dict, table: str, folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / f"{name}.md").write_text(table)
    print(table)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
