"""GGUF: a GPTQ folder (and optionally an adapter) as one llama.cpp file.

`q4_1.py` holds the block math and the plan (every refusal before anything is written); `llamacpp.py`
runs llama.cpp's own converter for the rest of the file, in a child process, with our blocks substituted.
The drivers below tie the two; `llamacpp.py` imports `q4_1.py`, never this package's drivers.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...names import GGUF_EMBEDDINGS
from ...utils.atomic import atomic_output_file, check_output_file
from ...merge.adapters import LayerAdapter
from .q4_1 import GGUFPlan, plan_gguf

__all__ = ["describe_gguf", "describe_gguf_merge", "export_gguf", "merge_gguf"]


# --- the exports ------------------------------------------------------------------------------------------


def export_gguf(src, dest, overwrite: bool = False, progress: bool = True, widen: bool = False,
                embeddings: str = "f16") -> dict:
    """Write the GPTQ folder `src` (4-bit, contiguous groups, group size a multiple of 32) as the GGUF file `dest`.

    Quantized linears become Q4_1 block for block; the rest is what llama.cpp's `convert_hf_to_gguf.py`
    writes for the architecture. `widen` also takes 2- and 3-bit folders (exact, at 4-bit size).
    `embeddings`: the token embedding and an untied output head as "f16" (as the GPTQ folder holds them, the
    default) or "q8_0" (what llama.cpp's quantizer writes for them: about 47% smaller, not lossless).
    Returns a summary dict (`describe_gguf(summary)` says it in a line), including `max_m_rounding_error`:
    the largest error rounding `m` to fp16 made, in quantization steps.
    """
    return _export(src, dest, overwrite, progress, widen, embeddings=embeddings)


def merge_gguf(base, adapter, dest, float_shifts: bool | None = None, overwrite: bool = False,
               progress: bool = True, widen: bool = False, embeddings: str = "f16") -> tuple[dict, dict]:
    """Fold a QA-LoRA adapter into the GPTQ folder `base` and write the GGUF file `dest`, no GPTQ folder between.

    Args:
        float_shifts: None (derived): the adapter's real-valued zero shifts go into `m` unrounded, except
            for `exact` adapters, which trained with integer shifts and get exactly those (their trained
            model). True forces float shifts for exact adapters too; False rounds every shift to the
            nearest integer, as a GPTQ merge would.
        embeddings: as in :func:`export_gguf`.
    Returns (merge report, export summary).
    """
    from ...merge.adapters import read_adapter

    config, layers = read_adapter(adapter)  # raises on a broken or foreign adapter, before any work
    strategy = config.get("merge_strategy") or "nearest"
    integer = (strategy == "exact") if float_shifts is None else not float_shifts
    plan = plan_gguf(base, widen)
    _check_adapter_fits(plan, layers)
    merge = {"adapter": str(adapter), "integer_shifts": integer, "adapter_strategy": strategy}
    summary = _export(base, dest, overwrite, progress, widen, plan=plan, merge=merge, embeddings=embeddings)
    return summary.pop("merge_report"), summary


def _check_adapter_fits(plan: GGUFPlan, layers: dict[str, LayerAdapter]) -> None:
    by_name = {layer.name: layer for layer in plan.layers}
    for name, adapter in layers.items():
        if name not in by_name:
            raise ValueError(f"merge gguf: the adapter targets {name}, which is not a quantized linear of {plan.src}; "
                             "pass the GPTQ checkpoint the adapter was trained on.")
        layer = by_name[name]
        if adapter.out_features != layer.out_features:
            raise ValueError(f"merge gguf: the adapter of {name} has {adapter.out_features} outputs but the base layer "
                             f"has {layer.out_features}; pass the GPTQ checkpoint the adapter was trained on.")
        g_idx = torch.arange(layer.in_features) // layer.group_size
        adapter.pool_factor(layer.in_features, layer.in_features // layer.group_size, g_idx, name)


def _export(src, dest, overwrite, progress, widen, plan: GGUFPlan | None = None, merge: dict | None = None,
            embeddings: str = "f16") -> dict:
    from . import llamacpp  # here, not above: `python -m ...llamacpp` imports this package first

    start = time.perf_counter()
    src, dest = Path(src), Path(dest)
    if embeddings not in GGUF_EMBEDDINGS:
        raise ValueError(f"export gguf: embeddings={embeddings!r}; choose one of {', '.join(GGUF_EMBEDDINGS)} "
                         "(--gguf-embeddings).")
    inputs = (src, merge["adapter"] if merge else None)  # the output may not be, or lie inside, one of them
    check_output_file(dest, overwrite, "export gguf", inputs)  # before the plan and the converter: fail fast
    plan = plan or plan_gguf(src, widen)
    converter = llamacpp.converter_dir()  # fetched once into the cache (pip download of the sdist)
    with atomic_output_file(dest, overwrite, "export gguf", inputs) as tmp:
        summary = llamacpp.run_converter(converter, src, plan.shards, tmp, merge, progress, embeddings)
    summary.update(source=str(src), out=str(dest), bits=int(plan.quant_config["bits"]), embeddings=embeddings,
                   group_size=plan.layers[0].group_size, architecture=plan.architecture,
                   seconds=round(time.perf_counter() - start, 3))
    return summary


def describe_gguf(summary: dict) -> str:
    """The one-line summary the CLI prints."""
    return (f"exported {summary['layers']} quantized linears ({summary['bits']}-bit g{summary['group_size']}) to GGUF "
            f"Q4_1 block for block{' (embeddings Q8_0)' if summary.get('embeddings') == 'q8_0' else ''}: {summary['out']} ({summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s); "
            f"fp16 rounding of the block minimums: at most {summary['max_m_rounding_error']:.2g} quantization steps")


def describe_gguf_merge(report: dict) -> str:
    """A short human summary of a GGUF merge report."""
    t = report["total"]
    how = ("real-valued zero shifts folded into the fp16 minimums, NOT rounded to integers"
           if not report["integer_shifts"] else f"{report['shifts']} zero shifts")
    return (f"merged {t['layers']} layers into GGUF Q4_1 with {how}; mean |shift| {t['mean_abs_shift']:.4f} steps; "
            f"fp16 rounding of m at most {t['max_m_rounding_error']:.2g} steps"
            + (" (trained scales folded into d)" if t["trained_scales"] else ""))
