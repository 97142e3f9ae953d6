"""`QALoraConfig`: what a user chooses. What the checkpoint already says (bits, group size,
act-order, symmetry) is read from each layer, never repeated here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ...names import DEFAULT_LORA_ALPHA, DEFAULT_MERGE_STRATEGY, MERGE_STRATEGIES, QALORA

MergeStrategy = Literal[MERGE_STRATEGIES]  # the same as Literal["nearest", "calibrated", "exact"]


@dataclass
class QALoraConfig(PeftConfig):
    """Configuration of a QA-LoRA adapter on a GPTQ-quantized model.

    Args:
        r: rank of the adapter.
        lora_alpha: scaling numerator; the update is scaled by `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
        lora_dropout: dropout on the adapter's input.
        target_modules: module names or a regex; `"all-linear"` (the default) adapts every GPTQ linear.
        exclude_modules: names or a regex of modules never adapted.
        group_size: inputs per pooling group. `None` uses each layer's quantization group size; a
            value must be a whole multiple of it, or the adapter could never merge into zero points.
        use_rslora: scale by `lora_alpha / sqrt(r)` (rank-stabilized LoRA).
        init_lora_weights: `True` (A Kaiming-uniform, B zero), `"gaussian"` (A normal(0, 1/r), B zero)
            or `False` (both random: a non-identity adapter, for tests).
        train_scales: with `merge_strategy="exact"`, also learn a per-(group, column) factor on the
            fp16 scales, `s' = s * (1 + c)`, `c` starting at 0; the merge writes the new scales exactly.
            Default (None): on for "exact", off otherwise.
        scale_lr_ratio: the layer stores `c / scale_lr_ratio` as the parameter, so an Adam-type
            optimizer (which moves each parameter about `lr` per step) moves `c` this many times
            faster than A and B, with any Trainer and one learning rate. At 4 bits, 30 steps: held-out
            perplexity 37.97 at 10 (the default), 46.57 at 1, 39.02 at 25 (benchmarks/results/quality.md).
        scales_only: train only the fp16 scale factors (`train_scales`), no A and B at all: PEQA on a GPTQ base,
            the control that shows what the scales alone gain. Needs merge_strategy="exact" (the default).
        use_dora: QA-DoRA, as peft spells it: a trained magnitude per output column, `W' = m * (W + dW) / ||W + dW||`,
            merged exactly into the column's fp16 scales. `m` is stored relative to the base column norm,
            `(1 + e) * ||W||`, and moves `scale_lr_ratio` times faster than A and B, like the trained scales.
            train_scales then defaults to off (the magnitude is their per-column cousin).
        merge_strategy: how shifted zero points become integers at merge time: `"exact"` (the default)
            makes training itself see the integer merge, so the merged checkpoint equals the trained
            model; `"nearest"` rounds each shift of an unconstrained adapter on its own; `"calibrated"`
            rounds them with error feedback from calibration statistics. See the README's quality table.
        modules_to_save: other modules trained and saved in full (e.g. a classification head).
        bias: must be `"none"`: a trained bias could not be written into a GPTQ checkpoint.
    """

    r: int = field(default=16, metadata={"help": "Rank of the adapter."})
    lora_alpha: float = field(default=DEFAULT_LORA_ALPHA, metadata={"help": "Scaling numerator (lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "Modules to adapt; 'all-linear' means every GPTQ linear."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never adapted (names or regex)."}
    )
    group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Inputs per pooling group; None = the checkpoint's quantization group size."},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale by lora_alpha / sqrt(r)."})
    init_lora_weights: Union[bool, Literal["gaussian"]] = field(
        default=True, metadata={"help": "True (kaiming A, zero B), 'gaussian', or False (random B too)."}
    )
    merge_strategy: MergeStrategy = field(
        default=DEFAULT_MERGE_STRATEGY,
        metadata={"help": "Integer rounding of merged zeros: 'nearest', 'calibrated' or 'exact'."},
    )
    train_scales: Optional[bool] = field(
        default=None,
        metadata={"help": "With merge_strategy='exact', also train the fp16 scales (s' = s * (1 + c)); the merged "
                  "checkpoint stores them exactly. None = True for 'exact', False otherwise."},
    )
    scale_lr_ratio: float = field(
        default=10.0,
        metadata={"help": "With train_scales, the scale factors move this many times faster than A and B under "
                  "Adam-type optimizers at one learning rate (c is stored as c / ratio)."},
    )
    scales_only: bool = field(
        default=False,
        metadata={"help": "Train only the fp16 scale factors (no A, B): the scales-only (PEQA) control."},
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "QA-DoRA: a trained magnitude per output column, merged exactly into the fp16 scales."},
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Unused: GPTQ layers are [in, out]."})
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save in full."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    base_quantization: Optional[dict] = field(
        default=None,
        metadata={"help": "Filled in when the adapter is created: bits, group size and act-order of the base it "
                  "was trained on, checked again whenever the adapter is loaded or merged."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = QALORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.train_scales is None:
            self.train_scales = self.scales_only or (self.merge_strategy == "exact" and not self.use_dora)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"QALoraConfig: r={self.r!r} must be a positive integer.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"QALoraConfig: lora_dropout={self.lora_dropout} must be in [0, 1).")
        if self.scales_only and (self.merge_strategy != "exact" or not self.train_scales or self.use_dora):
            raise ValueError(
                "QALoraConfig: scales_only=True trains the fp16 scales and nothing else: it needs merge_strategy='exact' "
                f"and train_scales left on, without use_dora (got merge_strategy={self.merge_strategy!r}, "
                f"train_scales={self.train_scales!r}, use_dora={self.use_dora!r})."
            )
        check_shared(self, "QALoraConfig")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"QALoraConfig: init_lora_weights={self.init_lora_weights!r}; expected True, False or 'gaussian'."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        """peft's loader, after `adapters.read_adapter_config` checked a local folder: unknown keys (a newer
        version), wrong types and a weights file whose header lies are refused, naming the key and the fix."""
        checked = checked_folder(pretrained_model_name_or_path, subfolder)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.loaded_from = checked  # named by load errors
        return config

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


def check_shared(config, who: str) -> None:
    """The checks QALoraConfig and QAVeraConfig share: pooling, strategy, trained scales, bias, layer selection."""
    if config.group_size is not None and (not isinstance(config.group_size, int) or config.group_size <= 0):
        raise ValueError(
            f"{who}: group_size={config.group_size!r} must be a positive integer, or None to use the "
            "checkpoint's quantization group size."
        )
    if config.merge_strategy not in MERGE_STRATEGIES:
        raise ValueError(f"{who}: merge_strategy={config.merge_strategy!r}; expected one of {MERGE_STRATEGIES}.")
    if config.train_scales and config.merge_strategy != "exact":
        raise ValueError(
            f"{who}: train_scales=True needs merge_strategy='exact' (got {config.merge_strategy!r}): trained "
            "scales are only written exactly when training already sees the integer merge."
        )
    if not config.scale_lr_ratio > 0:
        raise ValueError(f"{who}: scale_lr_ratio={config.scale_lr_ratio!r} must be positive (10 is the default).")
    if config.bias != "none":
        raise ValueError(
            f"{who}: bias={config.bias!r} is not supported; a trained bias cannot be merged into a GPTQ "
            "checkpoint. Use bias='none'."
        )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{who}: layers_pattern needs layers_to_transform as well.")


def checked_folder(pretrained_model_name_or_path, subfolder=None) -> str | None:
    """Before peft reads a local adapter folder: its config and weights header checked (`adapters`); the path of
    its weights file, for load errors to name (None for a Hub name)."""
    from pathlib import Path

    from ...merge.adapters import SAVE_AGAIN, WEIGHTS_NAME, read_adapter_config, read_header

    folder = Path(pretrained_model_name_or_path, subfolder or "")
    if not folder.is_dir():
        return None
    read_adapter_config(folder)
    read_header(folder / WEIGHTS_NAME, SAVE_AGAIN)
    return str(folder / WEIGHTS_NAME)
