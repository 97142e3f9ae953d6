"""safetensors headers read with the stdlib, and refused when they lie about their file.

The format: 8 bytes of little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`
(offsets relative to the data after the header), then the data. A header from a stranger can claim
gigabytes of header, ranges past the end of a truncated file, ranges that overlap, or shapes that do
not fit their bytes; safetensors itself refuses most of these, but from deep inside, and only once a
command has started working. Part of `gptq.validate`, whose name prefixes every message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

OWNER = "gptq.validate"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it; `start`/`end` are absolute file offsets."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path, fix: str) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, with the header checked against the file's size; `fix` ends a refusal."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{OWNER}: {path} is {size} bytes, too short for a safetensors file. {fix}.")
        length = int.from_bytes(f.read(8), "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{OWNER}: {path} declares a {length:,}-byte header but the file is {size:,} bytes (safetensors "
                f"allows at most {MAX_HEADER_BYTES:,}): truncated, or not a safetensors file. {fix}."
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{OWNER}: the header of {path} is not valid JSON ({err}). {fix}.")
    if not isinstance(header, dict):
        raise ValueError(f"{OWNER}: the header of {path} is not a JSON object. {fix}.")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{OWNER}: the header of {path} has __metadata__ that is not an object of strings (safetensors "
                         f"requires strings). {fix}.")
    data_size = size - 8 - length
    entries = {key: _entry(path, key, info, 8 + length, data_size, fix) for key, info in header.items()}
    _check_layout(path, entries, 8 + length, data_size, fix)
    return entries


def _entry(path: Path, key: str, info, base: int, data_size: int, fix: str) -> TensorEntry:
    where = f"{OWNER}: {path}, tensor {key}:"
    if not isinstance(info, dict):
        raise ValueError(f"{where} the header entry is not an object. {fix}.")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ValueError(f"{where} unknown dtype {dtype!r}. {fix}.")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where} shape {shape!r} is not a list of sizes. {fix}.")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where} data_offsets {offsets!r} is not a [begin, end] byte range. {fix}.")
    begin, end = offsets
    if end > data_size:
        raise ValueError(
            f"{where} its bytes end at {end:,} but the file holds {data_size:,} bytes of data: the file is truncated "
            f"(an interrupted download?) or its header lies. {fix}."
        )
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise ValueError(f"{where} {dtype} {shape} takes {expected:,} bytes but the header gives it {end - begin:,}; "
                         f"{fix}.")
    return TensorEntry(path, dtype, tuple(shape), base + begin, base + end)


def _check_layout(path: Path, entries: dict[str, TensorEntry], base: int, data_size: int, fix: str) -> None:
    """Byte ranges must tile the data exactly, as safetensors writes them: no overlap, no gap."""
    position = base
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if entry.start != position:
            what = "overlaps the tensor before it" if entry.start < position else "leaves a gap before it"
            raise ValueError(f"{OWNER}: {path}, tensor {key}: its byte range {what} (bytes {entry.start - base:,}.."
                             f"{entry.end - base:,}). {fix}.")
        position = entry.end
    if position != base + data_size:
        raise ValueError(f"{OWNER}: {path} has {base + data_size - position:,} bytes after its last tensor. {fix}.")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
