"""Writing an in-memory GPTQ model (typically after `merge_and_unload`) as a GPTQ checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .gptq import checkpoint as ckpt
from .gptq.tensors import encode_zeros
from .quantized import gptq_linear_names, quant_tensors

GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx", "bias")


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
            asymmetric); those are written through a temporary gptq_v2 folder beside `out_dir`.
    """
    if format != "gptq":
        return _save_exported(model, Path(out_dir), tokenizer, format, overwrite, max_shard_bytes)
    source_quant = model.config.quantization_config
    source_quant = source_quant.to_dict() if hasattr(source_quant, "to_dict") else dict(source_quant)
    tensors = quantized_state_dict(model, zero_format)
    model_config = model.config.to_dict()
    model_config.pop("quantization_config", None)
    model_config["dtype"] = "float16"
    with ckpt.atomic_output_dir(Path(out_dir), overwrite) as tmp:
        write_sharded(tmp, tensors, max_shard_bytes)
        ckpt.write_configs(tmp, model_config, ckpt.output_quant_config(source_quant, zero_format))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    return Path(out_dir)


def _save_exported(model, out_dir: Path, tokenizer, format: str, overwrite: bool, max_shard_bytes: int) -> Path:
    import tempfile

    from .exports import export, format_named

    format_named(format)  # an unknown name fails before any work
    ckpt.check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.gptq-", dir=out_dir.parent) as tmp:
        gptq = save_quantized(model, Path(tmp) / "gptq", tokenizer, zero_format=2, max_shard_bytes=max_shard_bytes)
        export(gptq, out_dir, format, overwrite=overwrite, progress=False)
    return out_dir


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

