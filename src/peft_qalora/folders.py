"""Checkpoint folders without torch: shard lists, atomic output folders, and early shard copies.

Stdlib only, so the merge command can start copying shards before it imports torch (seconds on
a small machine): the copy, the import and the zero math then overlap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"gptq.checkpoint: {folder} has no config.json; pass a GPTQ checkpoint folder.")
    return json.loads(path.read_text())


def read_quant_config(folder: Path) -> dict:
    """The checkpoint's quantization config; raises when the folder is not GPTQ."""
    quant = read_config(folder).get("quantization_config")
    if not quant or quant.get("quant_method") != "gptq":
        method = (quant or {}).get("quant_method")
        raise ValueError(
            f"gptq.checkpoint: {folder} is not a GPTQ checkpoint (quant_method={method!r}); "
            "make one with `peft-qalora quantize MODEL_DIR OUT_DIR`."
        )
    return quant


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"gptq.checkpoint: no model.safetensors or {INDEX_NAME} in {folder}.")


def check_output_dir(dest: Path, overwrite: bool) -> None:
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"gptq.checkpoint: {dest} already exists; choose another folder or pass --overwrite.")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"gptq.checkpoint: {dest} exists and is not a folder; choose another path.")


@contextlib.contextmanager
def atomic_output_dir(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `dest`; rename it to `dest` only on success.

    An error or Ctrl-C removes the temporary folder, and `dest` is untouched until the final rename,
    so no half-written model ever sits where the user asked for one.
    """
    dest = Path(dest)
    check_output_dir(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardCopies:
    """Copies of a checkpoint's shards into a fresh temporary folder beside `dest`, made in a background
    thread (the kernel's `sendfile`: no GIL) from the moment the context opens.

    The folder becomes `dest` when the context closes normally; on an error or Ctrl-C the copying
    stops and the folder is removed, so nothing half-written ever sits at `dest`.
    """

    def __init__(self, base_dir, dest, overwrite: bool = False):
        self.base_dir = Path(base_dir)
        read_quant_config(self.base_dir)  # raises, naming the problem, on a folder that is not GPTQ
        self.shards = shard_files(self.base_dir)
        self.dest, self.overwrite = Path(dest), overwrite
        self.tmp: Path | None = None
        self._futures: dict[Path, Future] = {}

    def __enter__(self) -> "ShardCopies":
        self._atomic = atomic_output_dir(self.dest, self.overwrite)
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
