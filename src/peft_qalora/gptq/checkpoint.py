"""Reading and writing GPTQ checkpoint folders (safetensors shards + config), atomically.

What is written follows ../shared/design/gptq-format.md: `sym: false` once zeros moved,
`checkpoint_format` and `format` "gptq" (v1) or "gptq_v2", `pack_dtype` int32, `lm_head` false,
`meta.quantizer` keeping the source's list with our tag appended (GPTQModel refuses an asymmetric
v1 file without a `gptqmodel:X` tag), the same dict in `config.json["quantization_config"]` and
`quantize_config.json`, safetensors metadata `{"format": "pt"}`, an index when sharded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .folders import (  # noqa: F401  (re-exported: the torch-free part of the format)
    INDEX_NAME,
    atomic_output_dir,
    check_output_dir,
    pause_point,
    read_config,
    read_quant_config,
    shard_files,
)
from .streaming import ShardWriter, read_entry  # noqa: F401  (ShardWriter re-exported for the exports)
from .validate import Checkpoint, check_inside, read_shards

OUR_TAG = "peft-qalora:0.1.0"
GPTQMODEL_TAG = "gptqmodel:7.7.0"
# The fields a GPTQ loader reads; loader-only settings (backend, dataset, damp_percent...) are dropped,
# and never `dynamic` or `rotation` (see gptq-format.md).
KEPT_KEYS = ("bits", "group_size", "desc_act", "meta")
_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}


def zero_format_of(quant_config: dict) -> int:
    fmt = quant_config.get("checkpoint_format", quant_config.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq.checkpoint: checkpoint_format {fmt!r} is not supported; expected 'gptq' or 'gptq_v2'.")
    return 2 if fmt == "gptq_v2" else 1


def output_quant_config(source: dict, zero_format: int = 1, sym: bool = False) -> dict:
    """The quantization config to write for merged zeros (see the module docstring)."""
    out = {k: source[k] for k in KEPT_KEYS if source.get(k) is not None}
    fmt = "gptq_v2" if zero_format == 2 else "gptq"
    out.update(quant_method="gptq", checkpoint_format=fmt, format=fmt, sym=sym, pack_dtype="int32", lm_head=False)
    out.setdefault("desc_act", False)
    meta = dict(out.get("meta") or {})
    quantizer = list(meta.get("quantizer") or [])
    if not any(str(q).startswith("gptqmodel:") for q in quantizer):
        quantizer.append(GPTQMODEL_TAG)  # GPTQModel loads asymmetric v1 only with this tag
    if OUR_TAG not in quantizer:
        quantizer.append(OUR_TAG)
    meta["quantizer"] = quantizer
    out["meta"] = meta
    return out


def read_tensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}


def tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    except Exception as err:
        if getattr(err, "filename", None) is None:
            err.filename = str(path)  # safetensors' errors name no file; a full-disk message will
        raise
    pause_point("shard")  # a test kills writers here, mid-output (see atomic.pause_point)


def overwrite_tensors(path: Path, replacements: dict[str, torch.Tensor]) -> None:
    """Overwrite some tensors' bytes in a safetensors file, in place (same dtype and shape).

    The merge changes only qzeros (and trained scales), a few percent of the bytes: copying a shard
    and then writing those tensors at their header offsets costs about a `cp`, and never holds more
    than one tensor in memory.
    """
    with open(path, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        for key, tensor in replacements.items():
            info = header[key]
            start, end = info["data_offsets"]
            same = list(tensor.shape) == info["shape"] and _DTYPES.get(tensor.dtype) == info["dtype"]
            data = tensor.detach().contiguous().cpu().numpy().tobytes() if same else b""
            if not same or len(data) != end - start:
                raise ValueError(
                    f"gptq.checkpoint: new {key} is {tensor.dtype} {list(tensor.shape)} but the file holds "
                    f"{info['dtype']} {info['shape']} ({end - start} bytes); a merge never changes shapes or dtypes."
                )
            f.seek(8 + header_len + start)
            f.write(data)
    pause_point("shard")


class ShardReader:
    """Reads single tensors of a sharded checkpoint at the offsets its checked headers give, each into memory
    of its own (no file stays mapped, so what was read leaves the process with the tensor).

    Args:
        checkpoint: the folder's `gptq.validate.Checkpoint`, when already checked (saves reading the headers again).
    """

    def __init__(self, folder: Path, checkpoint: Checkpoint | None = None):
        self.entries = checkpoint.tensors if checkpoint is not None else read_shards(folder)[1]
        self.key_to_shard: dict[str, Path] = {k: entry.file for k, entry in self.entries.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_shard

    def get(self, key: str) -> torch.Tensor:
        return read_entry(self.entries[key])

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key].shape)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_configs(folder: Path, model_config: dict, quant_config: dict) -> None:
    """config.json with the quantization config, and the same dict as quantize_config.json."""
    model_config = dict(model_config, quantization_config=quant_config)
    (Path(folder) / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    (Path(folder) / "quantize_config.json").write_text(json.dumps(quant_config, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer, generation config and other non-weight files; never weights or configs we write, never a
    link resolving outside `source` (it would copy a file from elsewhere on the machine into the output)."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        skip = path.suffix == ".safetensors" or path.name in ("config.json", "quantize_config.json", INDEX_NAME)
        if path.is_file() and not skip and not path.name.endswith((".bin", ".pt", ".pth")):
            check_inside(source, path)
            shutil.copy2(path, Path(dest) / path.name)
            copied.append(path.name)
    return copied
