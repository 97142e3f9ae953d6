"""Outputs that appear whole or not at all: the one mechanism every writer goes through.

Design note. A writer (quantize, save_quantized, merge, every export, train's adapter) writes into a
hidden temporary folder beside its destination (`.NAME.partial-XXXX`: same filesystem, never inside a
model folder), then
1. fsyncs every file it wrote, then the folders, so the rename below never outlives the data;
2. publishes with one rename: `renameat2(RENAME_NOREPLACE)` onto a free name or, when overwriting,
   `renameat2(RENAME_EXCHANGE)` with the old folder, which then sits at the temporary name and is
   removed. At every instant the destination is absent, the old folder or the new one, so a SIGKILL
   anywhere leaves one of those (and at most a hidden temporary folder). Writers racing for one
   destination each swap in a whole folder: with overwrite the last one wins; without, the one that
   finds the name taken at the end refuses and removes its own work. Never a mix.
3. fsyncs the parent folder, so the rename itself is durable.
An error or Ctrl-C removes the temporary folder and leaves the destination as it was; a full disk
(ENOSPC or EDQUOT, also wrapped by a library, e.g. safetensors' "os error 28") becomes a
`DiskFullError` naming the file being written. Where `renameat2` is missing (not Linux, or a
filesystem without it such as NFS) the old folder is renamed aside and the new one in under an flock
on the parent folder: racing writers still never mix, but a kill between those two renames leaves the
old folder at `.NAME.old-PID`. `atomic_output_file` is the same for one file (`os.replace`).
Stdlib only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DiskFullError", "atomic_cache_dir", "atomic_output_dir", "atomic_output_file", "check_apart",
           "check_output_dir", "check_output_file", "pause_point"]

PAUSE_AT, PAUSED = "PEFT_QALORA_PAUSE_AT", "PEFT_QALORA_PAUSED"
AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UMASK = os.umask(0o022)  # read once, at import (the only way to read it is to set it)
os.umask(_UMASK)
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc >= 2.28 (or musl >= 1.2.5): the locked fallback
    _renameat2 = None


class DiskFullError(OSError):
    """The disk (or the user's quota) filled while writing; the destination was left as it was."""

    def __init__(self, message: str, file: str = ""):
        super().__init__(errno.ENOSPC, message)
        self.file = file  # the file being written, relative to the output

    def __str__(self) -> str:
        return self.strerror


def pause_point(name: str) -> None:
    """Test hook (tests/test_atomic_writes.py): when $PEFT_QALORA_PAUSE_AT is `name`, create the file
    $PEFT_QALORA_PAUSED and wait while it exists, to be killed or let go. One lookup otherwise."""
    if os.environ.get(PAUSE_AT) != name:
        return
    marker = Path(os.environ[PAUSED])
    marker.write_text(name)
    while marker.exists():
        time.sleep(0.01)


def check_apart(dest, inputs, owner: str = "write") -> None:
    """Refuse an output that is, contains, or lies inside one of `inputs`, with or without overwrite: publishing
    it would replace or delete what the command reads. Links are resolved on both sides."""
    out = Path(dest).resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        relation = ("is" if out == src else "lies inside" if out.is_relative_to(src)
                    else "contains" if src.is_relative_to(out) else None)
        if relation:
            raise ValueError(f"{owner}: the output {dest} {relation} the input {source}; writing it would replace or "
                             "delete that input. Choose an output path outside every input.")


def check_output_dir(dest: Path, overwrite: bool, owner: str = "write", inputs=()) -> None:
    dest = Path(dest)
    check_apart(dest, inputs, owner)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{owner}: {dest} already exists; choose another folder or pass --overwrite.")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{owner}: {dest} exists and is not a folder; choose another path.")


def check_output_file(dest: Path, overwrite: bool, owner: str = "write", inputs=()) -> None:
    dest = Path(dest)
    check_apart(dest, inputs, owner)
    if dest.is_dir():
        raise FileExistsError(f"{owner}: {dest} is a folder; name the file to write.")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{owner}: {dest} already exists; choose another file or pass --overwrite.")


@contextlib.contextmanager
def atomic_output_dir(dest, overwrite: bool = False, owner: str = "write", inputs=()) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `dest`; it becomes `dest` in one rename on success.

    Args:
        overwrite: replace an existing `dest` (exchanged whole at the very end).
        owner: the command named in errors ("merge", "export awq", ...).
        inputs: the folders and files the command reads; `dest` may not be, contain or lie inside one.
    """
    dest = Path(dest)
    check_output_dir(dest, overwrite, owner, inputs)
    with _atomic_output(dest, overwrite, owner, folder=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_output_file(dest, overwrite: bool = False, owner: str = "write", inputs=()) -> Iterator[Path]:
    """Yield a hidden temporary path beside `dest`; it becomes `dest` in one rename on success."""
    dest = Path(dest)
    check_output_file(dest, overwrite, owner, inputs)
    with _atomic_output(dest, overwrite, owner, folder=False) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_cache_dir(dest, owner: str = "cache") -> Iterator[Path]:
    """`atomic_output_dir` for an entry of a shared cache: if another process published `dest` first, keep theirs.

    The caller checks `dest` first (a finished entry is reused, not rebuilt); this only settles a race.
    """
    dest, built = Path(dest), False
    try:
        with atomic_output_dir(dest, overwrite=False, owner=owner) as tmp:
            yield tmp
            built = True
    except FileExistsError:
        if not (built and dest.is_dir()):
            raise


@contextlib.contextmanager
def _atomic_output(dest: Path, overwrite: bool, owner: str, folder: bool) -> Iterator[Path]:
    """The steps of the design note, for a folder or one file."""
    existed, tmp, published = dest.exists(), None, False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temporary(dest, folder)
        pause_point("opened")
        yield tmp
        pause_point("written")
        # mkdtemp's 0700 and mkstemp's 0600 would make a published model private
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_UMASK)
        if folder:
            _sync_tree(tmp)
            _publish(tmp, dest, overwrite, owner)
        else:
            _fsync(tmp)
            if overwrite:
                os.replace(tmp, dest)  # one rename: the old file or the new one, the last writer's
            else:
                _rename_new_file(tmp, dest, owner)
        published = True
        _fsync(dest.parent)
    except BaseException as err:
        full = _disk_full(err, tmp, dest, existed, owner, published)
        if full is None:
            raise
        raise full from err
    finally:
        _remove(tmp)  # the temporary output, or after an exchange the old folder now at its name


def _make_temporary(dest: Path, folder: bool) -> Path:
    prefix = f".{dest.name}.partial-"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
    os.close(fd)
    return Path(name)


# ----------------------------------------------------------------- publishing


def _publish(tmp: Path, dest: Path, overwrite: bool, owner: str) -> None:
    """Move the folder `tmp` to `dest` in one rename; after an exchange the old folder sits at `tmp`."""
    while True:
        try:
            _rename2(tmp, dest, RENAME_NOREPLACE)
            return
        except FileExistsError:
            if not overwrite:
                raise FileExistsError(_taken(dest, owner)) from None
        except _Unsupported:
            return _publish_locked(tmp, dest, overwrite, owner)
        try:
            _rename2(tmp, dest, RENAME_EXCHANGE)
            pause_point("exchanged")
            return
        except FileNotFoundError:  # another writer moved `dest` away between the two calls: again
            continue


def _publish_locked(tmp: Path, dest: Path, overwrite: bool, owner: str) -> None:
    """Without renameat2: old folder aside, new one in, under an flock on the parent folder."""
    import fcntl

    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.lexists(dest):
            os.rename(tmp, dest)
            return
        if not overwrite:
            raise FileExistsError(_taken(dest, owner))
        aside = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, aside)
        os.rename(tmp, dest)
        os.rename(aside, tmp)  # removed with the temporary folder
    finally:
        os.close(fd)


def _rename_new_file(tmp: Path, dest: Path, owner: str) -> None:
    try:
        try:
            _rename2(tmp, dest, RENAME_NOREPLACE)
        except _Unsupported:
            os.link(tmp, dest)  # fails if `dest` exists, like RENAME_NOREPLACE
    except FileExistsError:
        raise FileExistsError(_taken(dest, owner)) from None


class _Unsupported(Exception):
    """renameat2 is missing, or the filesystem does not take the flag."""


def _rename2(src: Path, dst: Path, flags: int) -> None:
    if _renameat2 is None:
        raise _Unsupported
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise _Unsupported
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _taken(dest: Path, owner: str) -> str:
    return (f"{owner}: {dest} appeared while this run was writing it (another run writing the same path?); it was "
            "left as it is and nothing of this run was written. Choose another path, or pass --overwrite.")


# ----------------------------------------------------------------- durability and failures


def _sync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(Path(folder, name))
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        os.close(fd)


def _remove(path: Path | None) -> None:
    if path is None or not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _disk_full(err: BaseException, tmp, dest: Path, existed: bool, owner: str, published: bool):
    """A `DiskFullError` saying what happened when `err` is a full disk before publishing, else None."""
    if published or not isinstance(err, Exception) or not _is_disk_full(err):
        return None
    kept = " (it still holds what was there before)" if existed else ""
    file = _file_being_written(err, tmp, dest)
    return DiskFullError(
        f"{owner}: no space left on device while writing {file}; nothing was written to {dest}{kept}. Free space "
        f"on the disk holding {dest.parent} (the new output is written in full beside the destination before it "
        "replaces anything) and run again.", file)


def _is_disk_full(err: BaseException | None) -> bool:
    for _ in range(8):  # the error, or what it wraps
        if err is None:
            return False
        if getattr(err, "errno", None) in _DISK_FULL or any(f"os error {code})" in str(err) for code in _DISK_FULL):
            return True
        err = err.__cause__ or err.__context__
    return False


def _file_being_written(err: BaseException, tmp: Path | None, dest: Path) -> str:
    """The file named by the error, else the newest file of the temporary output."""
    if isinstance(err, DiskFullError) and err.file:  # from a nested output (an intermediate folder)
        return err.file
    if tmp is None or tmp.is_file():
        return dest.name
    for name in (getattr(err, "filename2", None), getattr(err, "filename", None)):
        if name and Path(name).is_relative_to(tmp) and Path(name) != tmp:
            return str(Path(name).relative_to(tmp))
    newest = max((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns, default=None)
    return str(newest.relative_to(tmp)) if newest is not None else "the first file"
