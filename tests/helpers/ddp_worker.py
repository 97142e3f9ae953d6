"""Run under a launcher (torchrun / accelerate launch): train one adapter per JSON setting with `train_adapter`.

    torchrun --nproc_per_node 2 tests/helpers/ddp_worker.py BASE WINDOWS.safetensors OUT_ROOT '{"name": {settings}, ...}'

Every process trains; rank 0 writes OUT_ROOT/<name>. The test runs the same settings in one process and
compares the adapters.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

import peft_qalora  # noqa: E402,F401
from peft_qalora.training.recipe import TrainSettings, train_adapter  # noqa: E402


def main() -> None:
    base, windows, out_root, runs = sys.argv[1], load_file(sys.argv[2])["windows"], Path(sys.argv[3]), json.loads(sys.argv[4])
    for name, settings in runs.items():
        summary = train_adapter(base, windows, out_root / name, TrainSettings(**settings))
        if summary["rank"] == 0:
            print(json.dumps({"name": name, "world_size": summary["world_size"], "global_batch": summary["global_batch"],
                              "batch_per_process": summary["batch_per_process"], "seconds": summary["seconds"],
                              "train_loss": summary["train_loss"]}),
                  flush=True)


if __name__ == "__main__":
    main()
