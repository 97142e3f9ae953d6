"""`QAVeraConfig`: a QA-VeRA adapter, as peft's `VeraConfig` spells it, on a GPTQ base."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..qalora.config import MergeStrategy, check_shared, checked_folder
from ...names import DEFAULT_MERGE_STRATEGY, QAVERA


@dataclass
class QAVeraConfig(PeftConfig):
    """Configuration of a QA-VeRA adapter: frozen random projections shared by all layers, two trained vectors a layer.

    The update of a layer is `dW = diag(b) B diag(d) A` on the group-pooled input: `A` (r, pooled inputs)
    and `B` (outputs, r) are slices of two random matrices made once per model from `projection_prng_key`;
    `d` (r,) and `b` (out,) are trained. It merges into the GPTQ zero points like QA-LoRA (`exact`: losslessly).

    Args:
        r: rank of the shared projections (peft's VeRA default, 256: VeRA trains `r + out` numbers a layer
            whatever the rank, so it affords a much larger one than LoRA).
        target_modules: module names or a regex; `"all-linear"` (the default) adapts every GPTQ linear.
        exclude_modules: names or a regex of modules never adapted.
        projection_prng_key: seed of the shared projections; the adapter file always records it.
        save_projection: also store the projections in the adapter file (peft's default), so it reloads
            identically whatever the torch version's generator does; without them they are regenerated from the key.
        vera_dropout: dropout on the adapter's input.
        d_initial: initial value of every `d` (peft's 0.1); `b` starts at 0, so the adapter starts as the identity.
        init_weights: `False` starts from a non-identity adapter (`b` ones, `d` random, as peft): tests only.
        group_size: inputs per pooling group. `None` uses each layer's quantization group size; a value must
            be a whole multiple of it, or the adapter could never merge into zero points.
        merge_strategy: `"exact"` (the default: training sees the integer merge, the merged checkpoint equals the
            trained model), `"nearest"` or `"calibrated"`, as in `QALoraConfig`.
        train_scales: with `"exact"`, also train a per-(group, column) factor on the fp16 scales, as
            `QALoraConfig(train_scales=True)`. Off by default, unlike QA-LoRA: VeRA is the cheapest adapter
            (`r + out` numbers a layer) and the scale factors are `groups x out` a layer, thousands of times more;
            training them is a separate choice (they alone are the scales-only control), not part of VeRA.
        scale_lr_ratio: with `train_scales`, the scale factors move this many times faster than `d` and `b`.
        modules_to_save: other modules trained and saved in full.
        bias: must be `"none"`: a trained bias could not be written into a GPTQ checkpoint.
    """

    r: int = field(default=256, metadata={"help": "Rank of the shared random projections (peft's VeRA: 256)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "Modules to adapt; 'all-linear' means every GPTQ linear."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never adapted (names or regex)."}
    )
    projection_prng_key: int = field(
        default=0, metadata={"help": "Seed of the shared projections A and B (torch.Generator on the CPU)."}
    )
    save_projection: bool = field(
        default=True,
        metadata={"help": "Store A and B in the adapter file; otherwise they are regenerated from the key on load."},
    )
    vera_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of the d vectors (b starts at 0)."})
    init_weights: bool = field(
        default=True, metadata={"help": "False: a non-identity start (b ones, d random), for tests."}
    )
    group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Inputs per pooling group; None = the checkpoint's quantization group size."},
    )
    merge_strategy: MergeStrategy = field(
        default=DEFAULT_MERGE_STRATEGY,
        metadata={"help": "Integer rounding of merged zeros: 'nearest', 'calibrated' or 'exact'."},
    )
    train_scales: bool = field(
        default=False,
        metadata={"help": "With merge_strategy='exact', also train the fp16 scales (s' = s * (1 + c)); off by default."},
    )
    scale_lr_ratio: float = field(
        default=10.0, metadata={"help": "With train_scales, the scale factors move this many times faster than d, b."}
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
        metadata={"help": "Filled in when the adapter is created: bits, group size and act-order of its base."},
    )
    projection_shape: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Filled in when the adapter is created: [pooled inputs, outputs] of the widest targeted "
                  "layer, the shape A and B are generated at (so the key alone rebuilds them, even without the model)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = QAVERA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"QAVeraConfig: r={self.r!r} must be a positive integer (peft's VeRA uses 256).")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool) \
                or not 0 <= self.projection_prng_key < 2**63:
            raise ValueError(f"QAVeraConfig: projection_prng_key={self.projection_prng_key!r} must be an integer in "
                             "[0, 2**63), a torch.Generator seed.")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ValueError(f"QAVeraConfig: vera_dropout={self.vera_dropout} must be in [0, 1).")
        if not isinstance(self.d_initial, (int, float)) or self.d_initial != self.d_initial or abs(self.d_initial) == float("inf"):
            raise ValueError(f"QAVeraConfig: d_initial={self.d_initial!r} must be a finite number (peft's default 0.1).")
        check_shared(self, "QAVeraConfig")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        """peft's loader, after `adapters.read_adapter_config` checked a local folder (as `QALoraConfig`'s)."""
        checked = checked_folder(pretrained_model_name_or_path, subfolder)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.loaded_from = checked  # named by load errors
        return config
