"""safetensors files read and written one tensor at a time: memory bounded by the largest tensor, not the shard.

Design note. `safetensors.torch.save_file` takes a whole dict of tensors and serializes it in memory before
writing, and `safe_open` maps the file, so every page read stays in the process's resident set while the
handle is open; an export holding one shard's tensors and its open sources peaked at about three shards.
Here a file is laid out up front from the names, dtypes and shapes alone, byte for byte as `save_file`
lays it out (checked in tests/test_export.py against `save_file`):
- tensors sorted by dtype, widest rank first (safetensors' `Dtype` order), then by name;
- data offsets back to back in that order;
- the header `{"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...}` as compact JSON in that
  order, padded with spaces to a multiple of 8 bytes, after its 8-byte little-endian length.
Then each tensor's bytes go to their place as they are produced (`os.pwrite`), and an unchanged tensor
is copied from its source file by the kernel (`os.copy_file_range`), never passing through this process.
Reads are `preadv` into a fresh buffer: no mapping left behind. Tensors are written in host byte order, as
`save_file` writes them on the little-endian hosts torch runs on.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from pathlib import Path

import torch

from .header import DTYPE_BYTES, TensorEntry

# safetensors' Dtype enum order (the sort key of save_file's layout), names as its headers spell them
DTYPE_RANK = {name: rank for rank, name in enumerate(
    ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "C64", "F64", "I64", "U64"))}
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
_CHUNK = 1 << 30  # bytes per system call (Linux moves at most ~2 GiB per read, write or copy_file_range)


def read_entry(entry: TensorEntry) -> torch.Tensor:
    """The tensor `entry` describes, read into memory of its own (the file is not mapped)."""
    data = torch.empty(entry.end - entry.start, dtype=torch.uint8)  # not zero-filled first, as a bytearray is
    with open(entry.file, "rb", buffering=0) as f:
        view, done = memoryview(data.numpy()), 0
        while done < len(view):
            n = os.preadv(f.fileno(), [view[done:done + _CHUNK]], entry.start + done)
            if n <= 0:
                raise OSError(f"gptq.streaming: {entry.file} ended inside a tensor (at byte {entry.start + done:,})")
            done += n
    return data.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


class ShardWriter:
    """A safetensors file laid out as `save_file` would from `specs` ({name: (dtype name, shape)}), filled tensor
    by tensor in any order; `close` checks every tensor was written.

    Args:
        metadata: the header's `__metadata__` (save_file's `metadata`).
    """

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        order = sorted(specs, key=lambda name: (-DTYPE_RANK[specs[name][0]], name))
        header, offset, self.places = {"__metadata__": metadata} if metadata else {}, 0, {}
        for name in order:
            dtype, shape = specs[name][0], [int(d) for d in specs[name][1]]
            size = DTYPE_BYTES[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            self.places[name] = (dtype, tuple(shape), offset)
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        self.base, self.size, self.pending = 8 + len(raw), offset, set(order)
        self._lock = threading.Lock()  # tensors are written from several threads (utils.threads)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(self.fd, memoryview(len(raw).to_bytes(8, "little") + raw), 0)
            os.ftruncate(self.fd, self.base + offset)
        except BaseException:
            os.close(self.fd)
            raise

    def _place(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        want_dtype, want_shape, offset = self.places[name]
        with self._lock:
            if (dtype, tuple(shape)) != (want_dtype, want_shape) or name not in self.pending:
                raise ValueError(f"gptq.streaming: {self.path.name}, tensor {name}: got {dtype} {list(shape)}, laid out "
                                 f"as {want_dtype} {list(want_shape)}{'' if name in self.pending else ' (already written)'}.")
            self.pending.discard(name)
        return self.base + offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes at their place (little-endian, as save_file writes on this host)."""
        at = self._place(name, DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape))
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(self.fd, memoryview(data), at)

    def copy(self, name: str, entry: TensorEntry) -> None:
        """Copy the tensor `entry` describes from its file, in the kernel."""
        at = self._place(name, entry.dtype, entry.shape)
        with open(entry.file, "rb", buffering=0) as src:
            done, size = 0, entry.end - entry.start
            while done < size:
                count, src_at, dst_at = min(_CHUNK, size - done), entry.start + done, at + done
                try:
                    n = os.copy_file_range(src.fileno(), self.fd, count, src_at, dst_at)
                except OSError as err:  # no in-kernel copy between these files: through a buffer
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    n = os.pwrite(self.fd, os.pread(src.fileno(), min(count, 1 << 26), src_at), dst_at)
                if n <= 0:
                    raise OSError(f"gptq.streaming: {entry.file} ended inside {name} (at byte {src_at:,})")
                done += n

    def close(self) -> None:
        os.close(self.fd)
        if self.pending:
            raise RuntimeError(f"gptq.streaming: {self.path} was closed with {len(self.pending)} tensors never written "
                               f"(e.g. {sorted(self.pending)[:3]}).")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        os.close(self.fd)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(self.path)  # a full disk names the file being written (atomic.DiskFullError)


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _CHUNK], at + done)

