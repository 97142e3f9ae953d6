"""A user's own training script on a QA-LoRA model: transformers' Trainer, or TRL's SFTTrainer.

    python tests/helpers/ddp_user_script.py BASE OUT_ROOT RUNS_JSON                      # one process
    torchrun --nproc_per_node 2 tests/helpers/ddp_user_script.py BASE OUT_ROOT RUNS_JSON  # the same script, 2 processes

RUNS_JSON maps a run name to {"kind": "trainer" | "sft", "steps", "lr", plus any TrainingArguments}. Each
run trains from the same seeded adapter on one global batch of 4 sequences (every step sees all of it, so the
data order cannot matter) and saves to OUT_ROOT/<name> with `trainer.save_model()`, which only rank 0 does.

The part a user writes is `train`; the rest is the test's bookkeeping: an audit hook records every file or
folder this process creates or opens for writing under OUT_ROOT (peft's save_pretrained writes
adapter_config.json with Python's `open`, beside the safetensors file), dumped to OUT_ROOT/writes-<rank>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoTokenizer, Trainer, TrainingArguments

import peft_qalora

GLOBAL_BATCH = 4
# SFT texts of very different lengths: any split of them over 2 processes gives unequal token counts,
# so a loss averaged per process instead of per token over all processes moves the step
TEXTS = ["To be.", "Now is the winter of our.", "Friends, Romans, countrymen, lend me your ears; I come to bury.",
         "All the world's a stage, and all the men and women merely players; they have their exits and their "
         "entrances, and one man in his time plays many parts."]


def train(kind: str, base: str, out: Path, steps: int, lr: float, extra: dict) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = peft_qalora.load_gptq_model(base)
    model = peft_qalora.prepare_model_for_training(model)
    model = get_peft_model(model, peft_qalora.QALoraConfig(r=4, lora_alpha=8))  # exact merge, trained scales
    tokenizer = AutoTokenizer.from_pretrained(base)
    common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=GLOBAL_BATCH // world,
                  learning_rate=lr, lr_scheduler_type="constant", optim="sgd", use_cpu=True, report_to=[],
                  save_strategy="no", logging_steps=1, seed=0, **extra)
    if kind == "trainer":
        windows = torch.randint(3, 128, (GLOBAL_BATCH, 32), generator=torch.Generator().manual_seed(1)).tolist()
        data = Dataset.from_dict({"input_ids": windows, "labels": windows})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data)
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, bf16=False, dataset_text_field="text")
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                             processing_class=tokenizer)
    trainer.train()
    trainer.save_model()


def _record_writes(root: Path) -> list[str]:
    """Paths under `root` this process creates, opens for writing, renames or removes (a sys audit hook)."""
    writes, root = [], str(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and str(args[0]).startswith(root):
            mode, flags = args[1], args[2]
            if (mode is not None and set(str(mode)) & set("wax+")) or (mode is None and flags & write_flags):
                writes.append(str(args[0]))
        elif event in ("os.mkdir", "os.rename", "os.remove") and str(args[0]).startswith(root):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return writes


def main() -> None:
    base, out_root, runs = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    out_root.mkdir(parents=True, exist_ok=True)
    writes = _record_writes(out_root)
    for name, run in runs.items():
        run = dict(run)
        train(run.pop("kind"), base, out_root / name, run.pop("steps"), run.pop("lr"), run)
    (out_root / f"writes-{rank}.json").write_text(json.dumps(writes[:]))


if __name__ == "__main__":
    main()
