"""Writing an in-memory GPTQ model (typically after `merge_and_unload`) as a GPTQ checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..gptq import checkpoint as ckpt
from ..gptq.tensors import encode_zeros
from ..names import GPTQ_SUFFIXES
from .load import gptq_linear_names, quant_tensors

GPTQ_KEYS = (*GPTQ_SUFFIXES, "bias")


def quantized_state_dict(model: nn.Module, zero_format: int = 1, dtype: torch.dtype = torch.float16) -> dict:
    """Checkpoint tensors of a GPTQ model: zeros re-encoded for `zero_format`, floats cast to `dtype`,
    kernel-private buffers dropped, tied tensors written once."""
    quant = set(gptq_linear_names(model))
    tensors, seen = {}, set()
    for name in quant:
        module = model.get_submodule(name)
        qt = quant_tensors(module)
        tensors[f"{name}.qweight"] = qt.qweight
        tensors[f"{name}.qzeros"] = encode_zeros(qt.zeros(), qt.bits, zero_format)
        tensors[f"{name}.scales"] = qt.scales.half()
        tensors[f"{name}.g_idx"] = qt.g_idx.to(torch.int32)
        if getattr(module, "bias", None) is not None:
            tensors[f"{name}.bias"] = module.bias.half()
    for key, value in model.state_dict(keep_vars=False).items():
        owner = key.rpartition(".")[0]
        if owner in quant or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    zero_format: int = 1,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    format: str = "gptq",
) -> Path:
    """Write `model` as a GPTQ checkpoint folder that transformers, GPTQModel, vLLM and ExLlamaV2 read.

    Args:
        zero_format: 1 writes the portable v1 checkpoint (true zeros in [1, 2^b - 1]); 2 writes gptq_v2.
        overwrite: replace an existing folder (atomically, at the very end).
        max_shard_bytes: start a new safetensors shard past this size.
        format: "gptq", or an export format ("awq", "compressed-tensors": what current vLLM serves
            asymmetric); those are written through a gptq_v2 folder inside the temporary output.
    The folder is written beside `out_dir` and renamed into place at the end (`atomic.atomic_output_dir`).
    """
    out_dir, owner = Path(out_dir), "save_quantized"
    fmt = None if format == "gptq" else _export_format(format)  # an unknown name fails before any work
    ckpt.check_output_dir(out_dir, overwrite, owner)
    with ckpt.atomic_output_dir(out_dir, overwrite, owner) as tmp:
        if fmt is None:
            write_gptq(model, tmp, tokenizer, zero_format, max_shard_bytes)
        else:  # the export reads a GPTQ folder: a gptq_v2 one (true zeros) inside the temporary output
            from ..exports.stream import plan_export, write_export

            gptq = tmp / ".gptq_v2"
            gptq.mkdir()
            write_gptq(model, gptq, tokenizer, 2, max_shard_bytes)
            write_export(gptq, tmp, fmt, plan_export(gptq, fmt), progress=False)
            shutil.rmtree(gptq)
    return out_dir


def _export_format(name: str):
    from ..exports import format_named

    return format_named(name)


def write_gptq(model: nn.Module, folder: Path, tokenizer, zero_format: int, max_shard_bytes: int) -> None:
    """The GPTQ checkpoint of `model` (shards, configs, tokenizer, generation config) into `folder`."""
    source_quant = model.config.quantization_config
    source_quant = source_quant.to_dict() if hasattr(source_quant, "to_dict") else dict(source_quant)
    model_config = model.config.to_dict()
    model_config.pop("quantization_config", None)
    model_config["dtype"] = "float16"
    write_sharded(folder, quantized_state_dict(model, zero_format), max_shard_bytes)
    ckpt.write_configs(folder, model_config, ckpt.output_quant_config(source_quant, zero_format))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        ckpt.write_shard(folder / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        ckpt.write_shard(folder / name, shard)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    ckpt.write_index(folder, weight_map, total)

