"""Recipe-driven QA-LoRA training on a GPTQ base with transformers' Trainer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

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
    extra: dict = field(default_factory=dict)
    """Other transformers.TrainingArguments, passed through."""

    def qalora_config(self) -> QALoraConfig:
        return QALoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=self.target_modules, merge_strategy=self.merge_strategy,
                            train_scales=self.train_scales, scale_lr_ratio=self.scale_lr_ratio)


def train_adapter(base_dir, train_windows: torch.Tensor, out_dir, settings: TrainSettings) -> dict:
    """Train a QA-LoRA adapter on `train_windows` and save it to `out_dir`; returns a summary."""
    torch.manual_seed(settings.seed)
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    model = prepare_model_for_training(load_gptq_model(base_dir, dtype=dtype), settings.gradient_checkpointing)
    model = get_peft_model(model, settings.qalora_config())
    args = TrainingArguments(
        str(Path(out_dir) / "trainer"), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=True, seed=settings.seed, bf16=settings.bf16,
        dataloader_num_workers=0, **settings.extra,
    )
    start = time.perf_counter()
    result = Trainer(model=model, args=args, train_dataset=lm_dataset(train_windows)).train()
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir)
    trainable, total = model.get_nb_trainable_parameters()
    return {"seconds": seconds, "seconds_per_step": seconds / settings.steps, "train_loss": result.training_loss,
            "trainable_parameters": trainable, "adapter_dir": str(out_dir), "model": model}
