"""Recipe-driven QA-LoRA training on a GPTQ base with transformers' Trainer, resumable.

With `save_steps`, Trainer's own checkpoints (adapter with its trained scales, optimizer, scheduler,
RNG states, trainer state) go to `OUT_DIR.checkpoints` beside the adapter folder; `resume` continues
from the newest complete one (a checkpoint killed while being saved lacks `trainer_state.json`, which
Trainer writes last, and is removed). The adapter folder itself is written at the end, atomically
(`atomic.atomic_output_dir`), and the checkpoints are then removed: their folder exists only while a
run is unfinished.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from .atomic import atomic_output_dir, check_output_dir, pause_point
from .config import QALoraConfig
from .data import lm_dataset
from .quantized import load_gptq_model
from .training import prepare_model_for_training


@dataclass
class TrainSettings:
    """How to train; every field is also a CLI flag and a YAML key."""

    steps: int = 60
    """Optimizer steps."""
    batch_size: int = 4
    """Sequences per step."""
    learning_rate: float = 2e-4
    """AdamW learning rate (the QA-LoRA paper's public script default)."""
    scale_lr_ratio: float = 10.0
    """How much faster the trained scale factors move than A and B (QALoraConfig.scale_lr_ratio)."""
    r: int = 16
    """Adapter rank."""
    lora_alpha: float = 32
    """Scaling numerator: the update is scaled by lora_alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    merge_strategy: str = "exact"
    """'exact' (training sees the integer merge; the default), 'nearest' or 'calibrated'."""
    train_scales: bool | None = None
    """With merge_strategy 'exact', also train the fp16 scales (None: on for exact)."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    bf16: bool = False
    """Train in bfloat16 (CPU autocast)."""
    seed: int = 0
    """Random seed."""
    save_steps: int = 0
    """Save a resumable checkpoint every this many steps to OUT_DIR.checkpoints (0: none)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in OUT_DIR.checkpoints (from step 0 if there is none)."""
    extra: dict = field(default_factory=dict)
    """Other transformers.TrainingArguments, passed through (they override the ones set here)."""

    def __post_init__(self):
        if self.save_steps < 0:
            raise ValueError(f"TrainSettings: save_steps={self.save_steps}; use a positive step count, or 0 for none.")

    def qalora_config(self) -> QALoraConfig:
        return QALoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=self.target_modules, merge_strategy=self.merge_strategy,
                            train_scales=self.train_scales, scale_lr_ratio=self.scale_lr_ratio)


CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json")


def checkpoints_dir(out_dir) -> Path:
    """Where `train_adapter` keeps resumable checkpoints: OUT_DIR.checkpoints, beside the adapter folder."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.checkpoints")


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` in `folder`; incomplete ones (a kill while saving) are removed."""
    complete = []
    for path in sorted(Path(folder).glob("checkpoint-*")):
        if _is_complete(path):
            complete.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return max(complete, key=lambda p: int(p.name.rpartition("-")[2]), default=None)


def _is_complete(path: Path) -> bool:
    if not path.name.rpartition("-")[2].isdigit() or not all((path / f).is_file() for f in CHECKPOINT_FILES):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == int(path.name.rpartition("-")[2])


def _resume_point(checkpoints: Path, resume: bool) -> Path | None:
    if not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        return None
    if not resume:
        raise FileExistsError(
            f"train: {checkpoints} holds the checkpoints of an unfinished run; pass --resume (resume: true) to "
            "continue it, or remove that folder to start over."
        )
    return last_checkpoint(checkpoints)


def trainer_arguments(settings: TrainSettings, checkpoints: Path) -> TrainingArguments:
    """Trainer's arguments for `settings`, checkpoints (if any) under `checkpoints`; `settings.extra` wins."""
    saving = dict(save_strategy="steps", save_steps=settings.save_steps, save_total_limit=2) \
        if settings.save_steps else dict(save_strategy="no")
    kwargs = dict(
        output_dir=str(checkpoints), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10,
        report_to=[], use_cpu=True, seed=settings.seed, bf16=settings.bf16, dataloader_num_workers=0, **saving,
    )
    return TrainingArguments(**{**kwargs, **settings.extra})


class _PausePoints(TrainerCallback):
    """`atomic.pause_point("step-N")` after each optimizer step: where a test kills a run."""

    def on_step_end(self, args, state, control, **kwargs):
        pause_point(f"step-{state.global_step}")


def train_adapter(base_dir, train_windows: torch.Tensor, out_dir, settings: TrainSettings,
                  overwrite: bool = False) -> dict:
    """Train a QA-LoRA adapter on `train_windows` and write it to `out_dir`; returns a summary.

    The folder appears complete at the end or not at all; `overwrite` replaces an existing one. With
    `settings.save_steps` the run can be killed and continued with `settings.resume` (module docstring).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, "train")  # before the work, not after it
    checkpoints = checkpoints_dir(out_dir)
    resume_from = _resume_point(checkpoints, settings.resume)
    torch.manual_seed(settings.seed)
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    model = prepare_model_for_training(load_gptq_model(base_dir, dtype=dtype), settings.gradient_checkpointing)
    model = get_peft_model(model, settings.qalora_config())
    trainer = Trainer(model=model, args=trainer_arguments(settings, checkpoints),
                      train_dataset=lm_dataset(train_windows), callbacks=[_PausePoints()])
    if not settings.save_steps:
        with contextlib.suppress(OSError):
            checkpoints.rmdir()  # Trainer makes its output folder even when it saves nothing there
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    with atomic_output_dir(out_dir, overwrite, "train") as tmp:
        model.save_pretrained(tmp)
    shutil.rmtree(checkpoints, ignore_errors=True)
    trainable, total = model.get_nb_trainable_parameters()
    first = int(resume_from.name.rpartition("-")[2]) if resume_from else 0
    return {"seconds": seconds, "seconds_per_step": seconds / max(settings.steps - first, 1),
            "train_loss": result.training_loss, "trainable_parameters": trainable, "adapter_dir": str(out_dir),
            "resumed_from_step": first, "model": model}
