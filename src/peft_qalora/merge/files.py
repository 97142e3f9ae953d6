"""File-to-file merge: fold an adapter into a GPTQ checkpoint's zeros without building the model.

Layer by layer: read a layer's qzeros, scales and g_idx (a few MB), compute its new zeros; then
overwrite just those tensors' bytes in copies of the shards in a temporary folder beside the
destination, and rename the folder at the end. The copies run in a background thread (the kernel's
`sendfile`, no GIL) while the main thread does the zero math, so the cost is about the larger of a
`cp` and the math; the command line starts them before it even imports torch (`gptq/folders.py`). Codes
are never read, and peak memory is the new zeros plus the adapter. The math is `merge.zeros.merge_zeros`,
the same function the in-memory merge calls.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import LayerAdapter, read_adapter
from ..gptq.folders import ShardCopies
from ..gptq import checkpoint as ckpt
from ..gptq.tensors import QuantTensors, encode_zeros, portable_zero_range, zeros_as_gptqmodel_reads, zeros_as_per_field_readers
from ..gptq.validate import Checkpoint, check_checkpoint
from ..utils.threads import run_in_threads
from .zeros import LayerMergeStats, code_moments, merge_zeros, merged_scales, total_stats

REPORT_NAME = "merge_report.json"


@dataclass
class MergePlan:
    """Everything checked before a byte is written."""

    base_dir: Path
    quant_config: dict
    layers: dict[str, LayerAdapter]
    reader: ckpt.ShardReader
    strategy: str
    zero_format: int
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)


def plan_merge(base_dir, adapter_dir, strategy: str | None = None, zero_format: int = 1, hessians=None,
               checkpoint: Checkpoint | None = None) -> MergePlan:
    """Check the base (unless `checkpoint` says it was), the adapter and their fit, before any work."""
    base_dir = Path(base_dir)
    checkpoint = checkpoint or check_checkpoint(base_dir)
    quant_config = checkpoint.quant_config
    adapter_config, layers = read_adapter(adapter_dir)
    strategy = strategy or adapter_config.get("merge_strategy") or "nearest"
    if strategy == "calibrated" and not hessians:
        raise ValueError(
            "merge: strategy 'calibrated' needs calibration statistics of the adapter model, which the command line "
            "does not compute: in Python, merge_checkpoint(base, adapter, out, hessians=calibrate(peft_model, windows)) "
            "(peft_qalora.calibrate); on the command line use --strategy nearest, or train with --merge-strategy exact."
        )
    reader = ckpt.ShardReader(base_dir, checkpoint)
    plan = MergePlan(base_dir, quant_config, layers, reader, strategy, zero_format, hessians or {})
    for name in layers:
        _check_layer_fits(plan, name)
        _check_scales_dtype(checkpoint, name, layers[name])
    return plan


def _check_scales_dtype(checkpoint: Checkpoint, name: str, adapter: LayerAdapter) -> None:
    entry = checkpoint.tensors.get(f"{name}.scales")
    changes_scales = adapter.scale_delta is not None or adapter.magnitude is not None
    if changes_scales and entry is not None and entry.dtype != "F16":
        raise ValueError(
            f"merge: the adapter trained the fp16 scales of {name} (trained scales or DoRA), but {entry.file} stores them as {entry.dtype}; "
            "the merge writes scales as fp16 only. Merge into an fp16-scales checkpoint, or train with "
            "--merge-strategy nearest (no trained scales)."
        )


def _check_layer_fits(plan: MergePlan, name: str) -> None:
    if f"{name}.qweight" not in plan.reader:
        kind = "a plain float layer" if f"{name}.weight" in plan.reader else "missing"
        raise ValueError(
            f"merge: the adapter targets {name}, which is {kind} in {plan.base_dir}; the adapter was trained on "
            "another base. Pass the GPTQ checkpoint it was trained on."
        )
    scales = plan.reader.shape(f"{name}.scales")
    g_idx = plan.reader.get(f"{name}.g_idx")
    adapter = plan.layers[name]
    if adapter.out_features != scales[1]:
        raise ValueError(
            f"merge: the adapter of {name} has {adapter.out_features} outputs but the base layer has {scales[1]}; "
            "pass the GPTQ checkpoint the adapter was trained on."
        )
    adapter.pool_factor(g_idx.numel(), scales[0], g_idx, name)  # raises when the pooling cannot merge
    if adapter.scale_delta is not None and list(adapter.scale_delta.shape) != scales:
        raise ValueError(
            f"merge: the adapter's trained scales of {name} are {list(adapter.scale_delta.shape)} but the base layer "
            f"has {scales} (groups, outputs); pass the GPTQ checkpoint the adapter was trained on."
        )


def merge_layer(plan: MergePlan, name: str) -> tuple[dict, LayerMergeStats, int]:
    """New `qzeros` (and `scales` if trained) of one layer; also how many base zeros per-field
    readers decode differently from GPTQModel."""
    bits = plan.quant_config["bits"]
    source_format = ckpt.zero_format_of(plan.quant_config)
    qzeros, scales, g_idx = (plan.reader.get(f"{name}.{t}") for t in ("qzeros", "scales", "g_idx"))
    out = scales.shape[1]
    zeros = zeros_as_gptqmodel_reads(qzeros, bits, source_format)[:, :out]
    misread = 0
    if source_format == 1 and zeros.numel() and int(zeros.min()) < 1:  # only a stored true zero of 0 carries
        misread = int((zeros_as_per_field_readers(qzeros, bits, source_format)[:, :out] != zeros).sum())
    adapter = plan.layers[name]
    delta = adapter.delta(g_idx.numel(), scales.shape[0], g_idx, name)
    new_zeros, stats = merge_zeros(
        zeros, scales, delta, bits, plan.strategy, plan.hessians.get(name), zero_format=plan.zero_format
    )
    new = {"qzeros": encode_zeros(new_zeros, bits, plan.zero_format)}
    moments = None
    if adapter.magnitude is not None:  # DoRA's column norms need the codes: the one case that reads qweight
        layer = QuantTensors(plan.reader.get(f"{name}.qweight"), qzeros, scales, g_idx, bits, source_format)
        moments = code_moments(layer.codes(), g_idx, layer.n_groups)
    trained = merged_scales(scales, zeros, new_zeros, adapter.scale_delta, adapter.magnitude, moments, name=name)
    if trained is not None:
        new["scales"] = trained
    return new, stats, misread


def layers_to_reencode(plan: MergePlan) -> list[str]:
    """Quantized linears the adapter does not train, when the output's zero convention is not the base's: their
    bytes would otherwise be copied as they are and read in the wrong convention."""
    if plan.zero_format == ckpt.zero_format_of(plan.quant_config):
        return []
    quantized = (k.removesuffix(".qweight") for k in plan.reader.key_to_shard if k.endswith(".qweight"))
    return sorted(name for name in quantized if name not in plan.layers)


def reencoded_zeros(plan: MergePlan, name: str) -> torch.Tensor:
    """The qzeros of `name` in the output's convention: the true zeros GPTQModel reads in the base, unchanged."""
    bits = plan.quant_config["bits"]
    out = plan.reader.shape(f"{name}.scales")[1]
    zeros = zeros_as_gptqmodel_reads(plan.reader.get(f"{name}.qzeros"), bits, ckpt.zero_format_of(plan.quant_config))
    zeros, low = zeros[:, :out], portable_zero_range(bits, plan.zero_format)[0]
    if zeros.numel() and int(zeros.min()) < low:
        raise ValueError(f"merge: {name}, which the adapter does not train, holds true zeros of {int(zeros.min())} "
                         f"that a v{plan.zero_format} checkpoint cannot store; write --checkpoint-format gptq_v2.")
    return encode_zeros(zeros, bits, plan.zero_format)


def merge_checkpoint(
    base_dir, adapter_dir, out_dir, strategy: str | None = None, zero_format: int = 1, overwrite: bool = False,
    hessians: dict | None = None, progress: bool = True,
) -> dict:
    """Merge `adapter_dir` into the GPTQ checkpoint `base_dir`, writing `out_dir`; returns the report."""
    with ShardCopies(base_dir, out_dir, overwrite, adapter_dir=adapter_dir) as copies:
        return merge_into(copies, adapter_dir, strategy, zero_format, hessians, progress)


def merge_into(copies: ShardCopies, adapter_dir, strategy: str | None = None, zero_format: int = 1,
               hessians: dict | None = None, progress: bool = True) -> dict:
    """The merge, writing into `copies` (shard copies already under way: see `folders.ShardCopies`)."""
    start = time.perf_counter()
    plan = plan_merge(copies.base_dir, adapter_dir, strategy, zero_format, hessians, copies.checkpoint)
    per_layer, misread = {}, {}
    by_shard: dict[Path, dict[str, torch.Tensor]] = {shard: {} for shard in copies.shards}
    bar = tqdm(total=len(plan.layers), desc="merging layers", unit="layer", disable=not progress)

    def merged(name: str, result: tuple) -> None:
        new, per_layer[name], misread[name] = result
        for field_name, tensor in new.items():
            key = f"{name}.{field_name}"
            by_shard[plan.reader.key_to_shard[key]][key] = tensor
        bar.update(1)

    run_in_threads(sorted(plan.layers), lambda name: merge_layer(plan, name), merged)
    bar.close()
    outside = layers_to_reencode(plan)
    for name in outside:  # a few KB each: the zeros of layers the adapter does not train, in the output's convention
        key = f"{name}.qzeros"
        by_shard[plan.reader.key_to_shard[key]][key] = reencoded_zeros(plan, name)
    for shard in copies.shards:
        ckpt.overwrite_tensors(copies.wait(shard), by_shard[shard])
    _write_metadata(plan, copies.tmp)
    per_layer = dict(sorted(per_layer.items()))  # threads finish in any order; the report's sums go in one
    report = build_report(plan, per_layer, sum(misread.values()), time.perf_counter() - start,
                          reencoded=len(outside))
    (copies.tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write_metadata(plan: MergePlan, tmp: Path) -> None:
    ckpt.copy_side_files(plan.base_dir, tmp)
    index = plan.base_dir / ckpt.INDEX_NAME
    if index.is_file():
        (tmp / ckpt.INDEX_NAME).write_text(index.read_text())
    model_config = ckpt.read_config(plan.base_dir)
    model_config.pop("quantization_config", None)
    ckpt.write_configs(tmp, model_config, ckpt.output_quant_config(plan.quant_config, plan.zero_format))


def build_report(plan: MergePlan, per_layer: dict[str, LayerMergeStats], misread: int, seconds: float,
                 reencoded: int = 0) -> dict:
    bits = plan.quant_config["bits"]
    return {
        "strategy": plan.strategy,
        "bits": bits,
        "group_size": plan.quant_config.get("group_size"),
        "checkpoint_format": "gptq_v2" if plan.zero_format == 2 else "gptq",
        "portable_zero_range": list(portable_zero_range(bits, plan.zero_format)),
        "base_zeros_misread_by_per_field_loaders": misread,
        "layers_outside_the_adapter_reencoded": reencoded,  # the same zeros, stored in the output's convention
        "seconds": round(seconds, 3),
        "total": total_stats(per_layer),
        "layers": {name: stats.to_dict() for name, stats in sorted(per_layer.items())},
    }


def describe_merge(report: dict) -> str:
    """A short human summary of a merge report."""
    t = report["total"]
    lines = [
        f"merged {t['layers']} layers ({report['bits']}-bit, strategy {report['strategy']}, "
        f"{report['checkpoint_format']}) in {report['seconds']:.1f} s",
        f"  zeros moved   {t['moved']:>10,} of {t['zeros']:,} ({100 * t['moved'] / max(t['zeros'], 1):.2f}%)",
        f"  zeros clamped {t['clamped']:>10,}",
        f"  mean |shift| {t['mean_abs_shift']:.4f} steps; rounding error mean {t['mean_rounding_error']:.4f}, "
        f"max {t['max_rounding_error']:.4f} steps",
    ]
    if t["unportable_base_zeros"] or report["base_zeros_misread_by_per_field_loaders"]:
        lines.append(
            f"  base held {t['unportable_base_zeros']:,} zeros outside the portable range "
            f"({report['base_zeros_misread_by_per_field_loaders']:,} read differently by vLLM/ExLlamaV2 than by "
            "GPTQModel); the v1 output clamps them, --checkpoint-format gptq_v2 keeps them"
        )
    return "\n".join(lines)
