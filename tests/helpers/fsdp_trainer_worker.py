"""`train_adapter` (transformers' Trainer) with `TrainSettings(shard_optimizer=True)`, under torchrun.

    torchrun --nproc_per_node 2 tests/helpers/fsdp_trainer_worker.py BASE WINDOWS.safetensors OUT '{settings}'

Rank 0 prints the summary, its echo lines and the adapter's parameter types as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file  # noqa: E402

import peft_qalora  # noqa: E402,F401
import peft_qalora.training.recipe as train  # noqa: E402


def main() -> None:
    base, windows, out, settings = sys.argv[1], load_file(sys.argv[2])["windows"], sys.argv[3], json.loads(sys.argv[4])
    lines = []
    settings = train.TrainSettings(**settings, shard_optimizer=True)
    summary = train.train_adapter(base, windows, out, settings, echo=lines.append)
    model = summary.pop("model")
    if summary["rank"] == 0:
        print(json.dumps({**summary, "echo": lines,
                          "adapter_types": sorted({type(p).__name__ for p in model.parameters() if p.requires_grad})}),
              flush=True)


if __name__ == "__main__":
    main()
