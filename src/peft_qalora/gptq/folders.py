"""Checkpoint folders without torch: shard lists, atomic output folders, and early shard copies.

Stdlib and numpy only (the folder checks live in `gptq/validate.py`, atomic outputs in `utils/atomic.py`), so
the merge command can start copying shards before it imports torch (seconds on a small machine): the
copy, the import and the zero math then overlap.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..utils.atomic import DiskFullError, atomic_output_dir, atomic_output_file, check_output_dir, pause_point
from .validate import INDEX_NAME, Checkpoint, check_checkpoint, read_config, read_quant_config, read_shards

__all__ = ["INDEX_NAME", "DiskFullError", "ShardCopies", "atomic_output_dir", "atomic_output_file", "check_output_dir",
           "pause_point", "read_config", "read_quant_config", "shard_files"]


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order, each checked (see `gptq.validate`): a plain file
    name inside the folder, no link outside it, a header that matches the file and agrees with the index."""
    return read_shards(folder)[0]


class ShardCopies:
    """Copies of a checkpoint's shards into a fresh temporary folder beside `dest`, made in a background
    thread (the kernel's `sendfile`: no GIL) from the moment the context opens.

    The folder becomes `dest` when the context closes normally (`atomic.atomic_output_dir`); on an error
    or Ctrl-C the copying stops and the folder is removed, so nothing half-written ever sits at `dest`.
    """

    def __init__(self, base_dir, dest, overwrite: bool = False, owner: str = "merge", adapter_dir=None):
        self.base_dir = Path(base_dir)
        self.inputs = (base_dir, adapter_dir)
        check_output_dir(dest, overwrite, owner, self.inputs)  # before a byte is read or copied
        # every check on the folder, before a byte is copied: raises, naming the file, the tensor and the fix
        self.checkpoint: Checkpoint = check_checkpoint(self.base_dir)
        self.shards = self.checkpoint.shards
        self.dest, self.overwrite, self.owner = Path(dest), overwrite, owner
        self.tmp: Path | None = None
        self._futures: dict[Path, Future] = {}

    def __enter__(self) -> "ShardCopies":
        self._atomic = atomic_output_dir(self.dest, self.overwrite, self.owner, self.inputs)
        self.tmp = self._atomic.__enter__()
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="copy-shards")
        self._futures = {s: self._copier.submit(shutil.copyfile, s, self.tmp / s.name) for s in self.shards}
        return self

    def wait(self, shard: Path) -> Path:
        """The copy of `shard`, once complete."""
        self._futures[shard].result()
        return self.tmp / shard.name

    def __exit__(self, *exc) -> bool:
        self._copier.shutdown(wait=True, cancel_futures=True)  # on an error, stop copying before the folder goes
        return bool(self._atomic.__exit__(*exc))
