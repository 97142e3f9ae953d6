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


__all__ = ["FORMATS", "describe", "export", "format_named"]
