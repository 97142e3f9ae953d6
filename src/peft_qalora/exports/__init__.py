"""Exports of a GPTQ checkpoint (merged or base) to what serving engines read, and of a QA-LoRA adapter
to a standard LoRA. One module per target format; all read GPTQ tensors through `gptq/`."""

from __future__ import annotations

from pathlib import Path

from ..names import FILE_FORMATS, FOLDER_FORMATS
from .awq import AWQFormat
from .compressed_tensors import CompressedTensorsFormat
from .stream import describe_folder_export
from .stream import export_checkpoint

FORMATS = dict(zip(FOLDER_FORMATS, (AWQFormat, CompressedTensorsFormat)))  # format name -> writer


def export(src, dest, format: str, overwrite: bool = False, progress: bool = True, **options) -> dict:
    """Convert the GPTQ folder `src` (merged or base) to `format`, writing `dest`.

    Args:
        format: "awq" (4-bit, contiguous groups: what vLLM serves asymmetric), "compressed-tensors"
            (pack-quantized, 2/3/4/8 bits, act-order kept as `weight_g_idx`), or "gguf" (one file for
            llama.cpp: 4-bit contiguous groups as Q4_1, block for block; `widen=True` takes 2/3-bit).
        overwrite: replace an existing `dest` (atomically, at the very end).
    Returns a summary dict (format, layers, bits, bytes, seconds); `describe_export(summary)` says it in a line.
    """
    if format == "gguf":
        from .gguf import export_gguf

        return export_gguf(src, dest, overwrite=overwrite, progress=progress, **options)
    return export_checkpoint(Path(src), Path(dest), format_named(format), overwrite, progress)


def describe_export(summary: dict) -> str:
    """The summary line(s) the CLI prints for any export."""
    if summary["format"] == "gguf":
        from .gguf import describe_gguf

        return describe_gguf(summary)
    return describe_folder_export(summary)


def format_named(name: str):
    if name not in FORMATS:
        raise ValueError(f"export: unknown format {name!r}; choose one of {sorted([*FORMATS, *FILE_FORMATS])}.")
    return FORMATS[name]()


__all__ = ["FILE_FORMATS", "FORMATS", "describe_export", "export", "format_named", "merge_and_export"]


def merge_and_export(base, adapter, dest, format: str, strategy: str | None = None, overwrite: bool = False,
                     progress: bool = True) -> tuple[dict, dict]:
    """Merge `adapter` into the GPTQ folder `base` and write the result as `format` at `dest`.

    The format is checked against the base before any work. The merge goes to a GPTQ folder holding
    true zeros (gptq_v2: AWQ and compressed-tensors store a zero of 0, so nothing is clamped to GPTQ
    v1's range) inside `dest`'s temporary folder, is exported beside it and removed before the whole
    is renamed to `dest` (`atomic.atomic_output_dir`); `merge_report.json` travels along.
    Returns (merge report, export summary).
    """
    import shutil
    import time

    from ..gptq.folders import atomic_output_dir, check_output_dir
    from ..merge.files import merge_checkpoint
    from .stream import plan_export, write_export

    fmt, dest = format_named(format), Path(dest)
    owner = f"merge --format {format}"
    check_output_dir(dest, overwrite, owner, inputs=(base, adapter))
    plan_export(Path(base), fmt)  # the format's refusals, before any work
    with atomic_output_dir(dest, overwrite, owner, inputs=(base, adapter)) as tmp:
        merged = tmp / ".merged-gptq_v2"
        report = merge_checkpoint(base, adapter, merged, strategy=strategy, zero_format=2, progress=progress)
        start = time.perf_counter()
        summary = write_export(merged, tmp, fmt, plan_export(merged, fmt), progress)
        shutil.rmtree(merged)
    return report, dict(summary, source=str(base), out=str(dest), seconds=round(time.perf_counter() - start, 3))
