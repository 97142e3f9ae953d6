"""What tests that start torchrun / accelerate processes share."""

from __future__ import annotations

import os


def launcher_env() -> dict:
    """Our environment for a launched group: offline, one thread a process (2 processes on 2 cores), and none
    of a surrounding launcher's rendezvous variables (a test run under torchrun must not join its group)."""
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
