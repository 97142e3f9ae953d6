"""Exports of a GPTQ checkpoint (merged or base) to what serving engines read, and of a QA-LoRA adapter
to a standard LoRA. One module per target format; all read GPTQ tensors through `gptq/`."""

from __future__ import annotations

from pathlib import Path

from .awq import AWQFormat
from .compressed_tensors import CompressedTensorsFormat
from .stream import describe, export_checkpoint

FORMATS = {"awq": AWQFormat, "compressed-tensors": CompressedTensorsFormat}


def export(src, dest, format: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert the GPTQ folder `src` (merged or base) to `format`, writing the folder `dest`.

    Args:
        format: "awq" (4-bit, contiguous groups: what vLLM serves asymmetric) or "compressed-tensors"
            (pack-quantized, 2/3/4/8 bits, act-order kept as `weight_g_idx`).
        overwrite: replace an existing `dest` (atomically, at the very end).
    Returns a summary dict (format, layers, bits, bytes, seconds); `describe(summary)` says it in a line.
    """
    return export_checkpoint(Path(src), Path(dest), format_named(format), overwrite, progress)


def format_named(name: str):
    if name not in FORMATS:
        raise ValueError(f"export: unknown format {name!r}; choose one of {sorted(FORMATS)}.")
    return FORMATS[name]()


__all__ = ["FORMATS", "describe", "export", "format_named", "merge_and_export"]


def merge_and_export(base, adapter, dest, format: str, strategy: str | None = None, overwrite: bool = False,
                     progress: bool = True) -> tuple[dict, dict]:
    """Merge `adapter` into the GPTQ folder `base` and write the result as `format` at `dest`.

    The format is checked against the base before any work. The merge goes to a temporary GPTQ folder
    beside `dest` holding true zeros (gptq_v2: AWQ and compressed-tensors store a zero of 0, so nothing
    is clamped to GPTQ v1's range), which is exported and removed; `merge_report.json` travels along.
    Returns (merge report, export summary).
    """
    import tempfile

    from ..folders import check_output_dir
    from ..merge_files import merge_checkpoint
    from .stream import plan_export

    fmt, dest = format_named(format), Path(dest)
    check_output_dir(dest, overwrite)
    plan_export(Path(base), fmt)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.merge-", dir=dest.parent) as tmp:
        merged = Path(tmp) / "gptq"
        report = merge_checkpoint(base, adapter, merged, strategy=strategy, zero_format=2, progress=progress)
        summary = export_checkpoint(merged, dest, fmt, overwrite, progress)
    return report, summary
