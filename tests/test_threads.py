"""utils.threads: every item done once, errors raised, at most `threads` at work, the memory budget respected."""

import threading
import time

import pytest

from peft_qalora.utils.threads import MEMORY_BUDGET, WORK_THREADS, run_in_threads, threads_for


@pytest.mark.parametrize("threads", [1, 3])
def test_every_item_is_done_once_with_its_result(threads):
    done = {}
    run_in_threads(range(20), lambda i: i * i, lambda i, r: done.setdefault(i, r), threads)
    assert done == {i: i * i for i in range(20)}


def test_at_most_threads_items_at_work_at_once():
    lock, running, peak = threading.Lock(), [0], [0]

    def work(_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1

    run_in_threads(range(24), work, lambda *_: None, threads=3)
    assert peak[0] == 3


def test_the_first_error_ends_the_run():
    def work(i):
        if i == 5:
            raise ValueError("layer 5 is corrupt")
        return i

    with pytest.raises(ValueError, match="layer 5 is corrupt"):
        run_in_threads(range(50), work, lambda *_: None, threads=2)


def test_threads_fit_the_memory_budget():
    assert threads_for(1) == WORK_THREADS
    assert threads_for(MEMORY_BUDGET) == 1 and threads_for(10 * MEMORY_BUDGET) == 1
    assert threads_for(MEMORY_BUDGET // 2) == min(2, WORK_THREADS)
