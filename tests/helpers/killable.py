"""Writers run in child processes that a test stops at a named point and kills with SIGKILL.

Children fork from a multiprocessing forkserver that imported torch, transformers, peft and our
modules once (~5 s), so a child costs a fork instead of a fresh interpreter. GPTQModel starts threads
when imported, so the server never imports it (a child that needs it imports it itself), and the
server never runs torch code (a fork after OpenMP ran can hang).

A child stops at `peft_qalora.utils.atomic.pause_point(name)`: it creates a marker file and waits while it
exists. `wait_paused` waits for the marker, `kill` sends SIGKILL, `release` deletes the marker. A child
can also give itself a small disk: `private_tmpfs` mounts size-limited tmpfs where only it sees them.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import time
import traceback
from pathlib import Path

from peft_qalora.utils.atomic import PAUSE_AT, PAUSED

PRELOAD = ["torch", "transformers", "peft", "safetensors.torch", "peft_qalora", "peft_qalora.cli",
           "peft_qalora.merge.files", "peft_qalora.exports", "peft_qalora.exports.lora", "peft_qalora.base.save",
           "peft_qalora.training.recipe", "peft_qalora.base.quantize", "peft_qalora.merge.adapters", "helpers.tiny", "helpers.killable",
           "test_atomic_writes", "test_resume"]
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(PRELOAD)


class Child:
    """A started child: `target(*args)` with the environment `env`; its outcome goes to `<marker>.json`."""

    def __init__(self, target, args: tuple, marker: Path, pause_at: str | None = None, env: dict | None = None):
        self.marker, self.result = Path(marker), Path(f"{marker}.json")
        env = dict(env or {}, **({PAUSE_AT: pause_at, PAUSED: str(marker)} if pause_at else {}))
        self.process = CTX.Process(target=_run, args=(target, args, env, str(self.result)))
        self.process.start()

    def wait_paused(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if not self.process.is_alive():
                raise AssertionError(f"the child ended before its pause point: {self.outcome()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError("the child did not reach its pause point in time")
            time.sleep(0.005)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()
        assert self.process.exitcode == -signal.SIGKILL

    def release(self) -> None:
        self.marker.unlink()

    def join(self, timeout: float = 120) -> dict:
        self.process.join(timeout)
        assert self.process.exitcode is not None, "the child did not finish in time"
        return self.outcome()

    def outcome(self) -> dict:
        return json.loads(self.result.read_text()) if self.result.is_file() else {"exitcode": self.process.exitcode}


def _run(target, args, env, result_path):
    os.environ.update(env)
    try:
        value = target(*args)
        outcome = {"ok": True, "value": value if isinstance(value, (dict, list, str, int, float)) else None}
    except BaseException as err:  # reported to the test, which asserts on it
        outcome = {"ok": False, "type": type(err).__name__, "error": str(err), "trace": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(outcome, default=str))


def private_tmpfs(mount_points: list[Path], sizes: list[int]) -> None:
    """In this single-threaded child: private user and mount namespaces, a tmpfs of each size at each point."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:  # MS_REC | MS_PRIVATE: nothing leaks out
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    for point, size in zip(mount_points, sizes):
        if libc.mount(b"tmpfs", os.fsencode(point), b"tmpfs", 0, f"size={size}".encode()) != 0:
            raise OSError(ctypes.get_errno(), f"mount tmpfs {point}")


_TMPFS: list[bool] = []


def tmpfs_available(scratch: Path) -> bool:
    """Whether a child may mount its own tmpfs here (unprivileged user namespaces; often off in CI)."""
    if not _TMPFS:
        (scratch / "probe").mkdir()
        _TMPFS.append(Child(private_tmpfs, ([scratch / "probe"], [4096]), scratch / "probe-marker").join()["ok"])
    return _TMPFS[0]
