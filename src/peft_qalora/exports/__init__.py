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


def merge_and_export(base, adapter, dest, format: str, strategy: str | None = None, overwrite: bool = False,
                     progress: bool = True) -> tuple[dict, dict]:
    """Merge `adapter` into the GPTQ folder `base` and write the result as `format` at `dest`, in one pass.

    The base and the format's refusals are checked before any work. Each linear is read once: an adapter's
    layer gets its merged true zeros (`merge.files.merge_layer`, as `merge` computes them, held as gptq_v2 so
    nothing is clamped to v1's range: AWQ and compressed-tensors store a zero of 0) and goes straight into the
    format's writer; the others go as the base holds them. `dest` appears whole or not at all
    (`atomic.atomic_output_dir`), `merge_report.json` inside. Returns (merge report, export summary).
    """
    import json
    import time

    from ..gptq.checkpoint import zero_format_of
    from ..gptq.folders import atomic_output_dir, check_output_dir
    from ..gptq.tensors import QuantTensors
    from ..gptq.validate import check_checkpoint
    from ..merge.files import REPORT_NAME, build_report, merge_layer, plan_merge
    from .stream import plan_export, read_layer, write_export

    start = time.perf_counter()
    fmt, base, dest = format_named(format), Path(base), Path(dest)
    owner = f"merge --format {format}"
    check_output_dir(dest, overwrite, owner, inputs=(base, adapter))
    checkpoint = check_checkpoint(base)
    export_plan = plan_export(base, fmt, checkpoint)  # the format's refusals, before any work
    merge_plan = plan_merge(base, adapter, strategy, zero_format=2, checkpoint=checkpoint)
    quant, reader, _ = export_plan
    bits, base_format = int(quant["bits"]), zero_format_of(quant)
    stats, misread = {}, {}

    def layer(name: str) -> QuantTensors:
        if name not in merge_plan.layers:
            return read_layer(reader, name, bits, base_format)
        new, stats[name], misread[name] = merge_layer(merge_plan, name)
        scales = new["scales"] if "scales" in new else reader.get(f"{name}.scales")
        return QuantTensors(reader.get(f"{name}.qweight"), new["qzeros"], scales, reader.get(f"{name}.g_idx"), bits, 2)

    with atomic_output_dir(dest, overwrite, owner, inputs=(base, adapter)) as tmp:
        summary = write_export(base, tmp, fmt, export_plan, progress, layer_source=layer)
        report = build_report(merge_plan, dict(sorted(stats.items())), sum(misread.values()),
                              time.perf_counter() - start)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report, dict(summary, source=str(base), out=str(dest), seconds=round(time.perf_counter() - start, 3))


__all__ = ["FILE_FORMATS", "FORMATS", "describe_export", "export", "format_named", "merge_and_export"]
