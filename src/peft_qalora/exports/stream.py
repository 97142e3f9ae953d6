"""The driver every quantized export shares: GPTQ folder in, another format's folder out, streamed.

Shard by shard: each source shard becomes one output shard of the same name, holding the converted
tensors of the quantized linears whose `qweight` it holds and every other tensor unchanged. A shard is
laid out from the formats' `specs` before a tensor is converted (`gptq.streaming.ShardWriter`, byte for
byte what `save_file` writes), then filled layer by layer, the unchanged tensors copied by the kernel, so
memory stays about one layer whatever the model's size. Every layer is checked against the format before
anything is written; the output goes to a hidden temporary folder renamed at the end
(`atomic.atomic_output_dir`).

A format subclasses `QuantFormat`: `check` refuses a layer it cannot write (naming the layer and the
fix), `specs` names the dtype and shape of each tensor `convert` will give for a layer (keyed by suffix),
`convert` gives them, `quant_config` the new config.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..gptq import checkpoint as ckpt
from ..gptq.tensors import QuantTensors
from ..gptq.validate import check_checkpoint
from ..names import GPTQ_SUFFIXES
from ..utils.threads import run_in_threads, threads_for


@dataclass
class LayerInfo:
    """What a format needs to know of one GPTQ linear before converting it."""

    name: str
    bits: int
    in_features: int
    out_features: int
    group_size: int
    act_order: bool  # groups scattered over the inputs (g_idx is not arange // group_size)
    n_groups: int = 0  # rows of scales; 0: in_features // group_size

    def __post_init__(self):
        self.n_groups = self.n_groups or (self.in_features // self.group_size if self.group_size else 1)


class QuantFormat:
    name = ""

    def plan(self, layers: list[LayerInfo]) -> None:
        """Check every layer before anything is written; remember what is model-wide."""
        if not layers:
            raise ValueError("export: the source holds no quantized linear (no *.qweight tensor); pass a GPTQ checkpoint.")
        sizes = sorted({layer.group_size for layer in layers})
        if len(sizes) > 1:
            raise ValueError(f"export {self.name}: the source mixes group sizes {sizes}; one config holds one size.")
        for layer in layers:
            self.check(layer)
        self.act_order = any(layer.act_order for layer in layers)

    def check(self, layer: LayerInfo) -> None:
        raise NotImplementedError

    def specs(self, layer: LayerInfo) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{suffix: (safetensors dtype name, shape)} of what `convert` gives for `layer`."""
        raise NotImplementedError

    def convert(self, name: str, tensors: QuantTensors) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quant_config(self, source: dict, layers: list[LayerInfo], float_linears: list[str]) -> dict:
        raise NotImplementedError

    def notes(self, layers: list[LayerInfo]) -> list[str]:
        """What a user should know about where the written folder can be served."""
        return []


def quantized_layers(reader: ckpt.ShardReader) -> list[str]:
    return sorted(k.removesuffix(".qweight") for k in reader.key_to_shard if k.endswith(".qweight"))


def float_linears(reader: ckpt.ShardReader) -> list[str]:
    """Modules holding a 2-D float `weight` outside the embeddings: linears a loader must leave in float."""
    names = []
    for key in sorted(reader.key_to_shard):
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and "embed" not in module and len(reader.shape(key)) == 2:
            names.append(module)
    return names


def layer_info(reader: ckpt.ShardReader, name: str, bits: int) -> LayerInfo:
    scales = reader.shape(f"{name}.scales")
    g_idx = reader.get(f"{name}.g_idx").long()
    n_groups, out = scales
    in_features = g_idx.numel()
    group_size = in_features // n_groups if n_groups else in_features
    contiguous = torch.equal(g_idx, torch.arange(in_features) // group_size)
    return LayerInfo(name, bits, in_features, out, group_size, not contiguous, n_groups)


def read_layer(reader: ckpt.ShardReader, name: str, bits: int, zero_format: int) -> QuantTensors:
    qweight, qzeros, scales, g_idx = (reader.get(f"{name}.{s}") for s in GPTQ_SUFFIXES)
    return QuantTensors(qweight, qzeros, scales, g_idx, bits, zero_format)


def plan_export(src: Path, fmt: QuantFormat, checkpoint=None) -> tuple[dict, ckpt.ShardReader, list[LayerInfo]]:
    """Read what the export needs and let the format refuse, before anything is written. `checkpoint`: the
    folder's `gptq.validate.Checkpoint` when already checked."""
    # every check on the folder: raises naming the file, the tensor and the fix
    checkpoint = checkpoint or check_checkpoint(src)
    if checkpoint.per_channel:
        raise ValueError(
            f"export {fmt.name}: {src} is quantized per channel (group_size -1); the exports write grouped layouts "
            "and do not convert per-channel layers. Serve the GPTQ folder itself (transformers and vLLM read "
            "group_size -1), or re-quantize with groups: peft-qalora quantize MODEL_DIR OUT_DIR --group-size 128."
        )
    quant, reader = checkpoint.quant_config, ckpt.ShardReader(Path(src), checkpoint)
    layers = [layer_info(reader, name, int(quant["bits"])) for name in quantized_layers(reader)]
    fmt.plan(layers)
    return quant, reader, layers


def export_checkpoint(src, dest, fmt, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert the GPTQ folder `src` to `fmt`, writing `dest` atomically; returns a summary."""
    start = time.perf_counter()
    src, dest = Path(src), Path(dest)
    ckpt.check_output_dir(dest, overwrite, f"export {fmt.name}", inputs=(src,))
    plan = plan_export(src, fmt)
    with ckpt.atomic_output_dir(dest, overwrite, f"export {fmt.name}", inputs=(src,)) as tmp:
        summary = write_export(src, tmp, fmt, plan, progress)
    return dict(summary, out=str(dest), seconds=round(time.perf_counter() - start, 3))


def write_export(src: Path, folder: Path, fmt: QuantFormat, plan: tuple, progress: bool = True,
                 layer_source: Callable[[str], QuantTensors] | None = None) -> dict:
    """Write the export of `src` into the existing (temporary) `folder`, `plan` from `plan_export`.

    `layer_source(name)` gives a linear's GPTQ tensors (default: as `src` holds them; the one-pass merge gives the
    merged ones). Layers are read, converted and written by a few threads at once (`utils.threads`)."""
    quant, reader, layers = plan
    bits, zero_format = int(quant["bits"]), ckpt.zero_format_of(quant)
    source = layer_source or (lambda module: read_layer(reader, module, bits, zero_format))
    by_name = {layer.name: layer for layer in layers}
    # a conversion holds its codes about four times over (read, two transposing copies, the output)
    codes = (reader.entries[f"{layer.name}.qweight"] for layer in layers)
    threads = threads_for(4 * max(entry.end - entry.start for entry in codes))
    weight_map, total = {}, 0
    bar = tqdm(total=len(layers), desc=f"exporting to {fmt.name}", unit="layer", disable=not progress)
    for shard in ckpt.shard_files(src):
        specs, copied, converted = _shard_layout(reader, shard, by_name, fmt)
        with ckpt.ShardWriter(folder / shard.name, specs, {"format": "pt"}) as writer:
            for key in copied:
                writer.copy(key, reader.entries[key])
            run_in_threads(converted, lambda module: _write_layer(writer, fmt, module, source(module)),
                           lambda module, _: bar.update(1), threads)
        ckpt.pause_point("shard")  # a test kills writers here, mid-output (see atomic.pause_point)
        weight_map.update({k: shard.name for k in specs})
        total += writer.size
    bar.close()
    if (src / ckpt.INDEX_NAME).is_file():
        ckpt.write_index(folder, weight_map, total)
    _write_config(src, folder, fmt.quant_config(quant, layers, float_linears(reader)))
    ckpt.copy_side_files(src, folder)
    return {"format": fmt.name, "source": str(src), "out": str(folder), "layers": len(layers), "bits": bits,
            "group_size": layers[0].group_size, "act_order": any(l.act_order for l in layers),
            "bytes": total, "notes": fmt.notes(layers)}


def _write_layer(writer: ckpt.ShardWriter, fmt: QuantFormat, module: str, tensors: QuantTensors) -> None:
    for suffix, tensor in fmt.convert(module, tensors).items():
        writer.write(f"{module}.{suffix}", tensor)


def _shard_layout(reader, shard: Path, layers: dict[str, LayerInfo], fmt) -> tuple[dict, list[str], list[str]]:
    """The output tensors of one shard ({name: (dtype, shape)}): converted linears (where their qweight lives) and
    the rest as is; also the keys copied unchanged and the linears converted."""
    specs, copied, converted = {}, [], []
    for key in [k for k, s in reader.key_to_shard.items() if s == shard]:
        module, _, suffix = key.rpartition(".")
        if module in layers and suffix in GPTQ_SUFFIXES:
            if suffix == "qweight":
                specs.update({f"{module}.{k}": spec for k, spec in fmt.specs(layers[module]).items()})
                converted.append(module)
        else:
            specs[key] = (reader.entries[key].dtype, reader.entries[key].shape)
            copied.append(key)
    return specs, copied, converted


def _write_config(src: Path, tmp: Path, quant_config: dict) -> None:
    """config.json with the new quantization config; no quantize_config.json (vLLM reads that file as
    a fallback, and a stale GPTQ one there would describe the wrong format)."""
    config = ckpt.read_config(src)
    config["quantization_config"] = quant_config
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def describe_folder_export(summary: dict) -> str:
    """The one-line summary the CLI prints (and a line per note)."""
    return (f"exported {summary['layers']} quantized linears ({summary['bits']}-bit g{summary['group_size']}"
            f"{', act-order' if summary['act_order'] else ''}) to {summary['format']}: {summary['out']} "
            f"({summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s)"
            + "".join(f"\n  note: {note}" for note in summary.get("notes", [])))


def check_zero_range(name: str, zeros: torch.Tensor, bits: int) -> None:
    """Raise, naming the layer, when true zeros do not fit a `bits`-bit field (AWQ and compressed-tensors
    store them as they are)."""
    lo, hi = (int(v) for v in torch.aminmax(zeros))
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"export: {name} holds true zeros in [{lo}, {hi}], outside a {bits}-bit field; the source "
                         "checkpoint is corrupt (a v1 file with zeros of 2^bits?). Re-merge it with peft-qalora.")
