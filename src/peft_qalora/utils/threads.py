"""Layer-at-a-time work on a few threads, for the streamed exports and the file merge.

Their work per layer is reads (preadv), numpy / torch math and writes (pwrite), which all release the GIL, so a
few threads use the cores a single loop leaves idle and overlap one layer's I/O with another's math. At most
2 x threads items are submitted and `threads` run at once, so memory stays a few layers whatever the model's size
(`threads_for` lowers the count where layers are large).
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

# The cores this process may use, at most 4 (each item in flight holds a layer or two in memory).
WORK_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
MEMORY_BUDGET = 1 << 30  # bytes the items in flight may hold together: peak RSS stays under 2 GB at 70B


def threads_for(bytes_per_item: int) -> int:
    """Threads whose items fit `MEMORY_BUDGET` together (a 70B MLP's export holds ~0.5 GB: 2 threads)."""
    return max(1, min(WORK_THREADS, MEMORY_BUDGET // max(bytes_per_item, 1)))


def run_in_threads(items: Iterable[T], work: Callable[[T], object], done: Callable[[T, object], None],
                   threads: int = WORK_THREADS) -> None:
    """`work(item)` for every item on up to `threads` threads; `done(item, result)` in the calling thread as each
    finishes (in order of completion). The first error ends the run with it, after the items in flight finish."""
    items = list(items)
    threads = max(1, min(threads, len(items)))
    if threads == 1:
        for item in items:
            done(item, work(item))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="peft-qalora") as pool:
        pending: dict = {}
        for item in items:
            pending[pool.submit(work, item)] = item
            if len(pending) >= 2 * threads:
                _collect(pending, wait(pending, return_when=FIRST_COMPLETED).done, done)
        _collect(pending, wait(pending).done, done)


def _collect(pending: dict, finished, done) -> None:
    for future in finished:
        done(pending.pop(future), future.result())
