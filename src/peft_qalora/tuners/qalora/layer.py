"""`QALoraLinear`: a group-pooled LoRA adapter around any GPTQ quantized linear.

forward: `base(x) + scaling * B(A(P(x)))`, `P` summing the inputs of each pooling group (see
`pooling.py`). With `merge_strategy="exact"` the adapter instead adds `P_q(x) @ (s * k)`, where
`k = clamp(round(delta / s))` are the integer zero shifts the merge will write, rounded with a
straight-through estimator so gradients reach A and B: the merged checkpoint then IS the trained
model.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...merge.zeros import (LayerMergeStats, code_moments, column_norms, dora_factor, dora_scales, group_delta,
                    merge_zeros, merged_scales, trained_scales)
from ..kernels import LayerCache, gptq_linear_forward
from ..pooling import GroupPooling
from ...base.load import quant_tensors, write_zeros


class RoundClampSTE(torch.autograd.Function):
    """clamp(round(x), low, high) forward; backward passes the gradient straight through the rounding
    and stops it where the clamp changed the value (a rounded value on a bound passes: torch's clamp
    with tensor bounds would halve it there). One autograd node instead of about ten."""

    @staticmethod
    def forward(ctx, x, low, high):
        rounded = torch.round(x)
        out = torch.clamp(rounded, min=low, max=high)
        ctx.save_for_backward(out == rounded)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class QALoraLayer(BaseTunerLayer):
    adapter_layer_names = ("qalora_A", "qalora_B", "qalora_scale", "qalora_magnitude")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "pool_factor", "merge_strategy", "scale_lr_ratio")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.pool_factor, self.merge_strategy, self.scale_lr_ratio = {}, {}, {}
        self.lora_dropout = nn.ModuleDict({})
        self.qalora_A = nn.ModuleDict({})
        self.qalora_B = nn.ModuleDict({})
        self.qalora_scale = nn.ParameterDict({})  # only for train_scales adapters: c / scale_lr_ratio, s' = s * (1 + c)
        self.qalora_magnitude = nn.ParameterDict({})  # only for DoRA: e / scale_lr_ratio, m = (1 + e) * ||W|| per column
        self._disable_adapters = False
        self.merged_adapters = []
        self._before_merge: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.merge_stats: dict[str, LayerMergeStats] = {}
        self.pooled_hessian: dict[str, torch.Tensor] = {}
        tensors = quant_tensors(base_layer)
        self.in_features, self.out_features = tensors.in_features, tensors.out_features
        self.quant_group_size = tensors.group_size
        # quantization-level pooling, shared by all adapters, on the codes' device (g_idx may sit on the CPU)
        self.pool = GroupPooling(tensors.g_idx, device=tensors.qweight.device)
        self.cache = LayerCache()
        self._moments = None  # code moments for DoRA's column norms, computed at first use
        self._base_norms = (None, None)  # (cache key, ||W|| per column): constant until a merge writes the layer

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        factor = pool_factor(config.group_size, self.quant_group_size, self.in_features, kwargs.get("name", ""))
        n_groups = self.pool.n_groups // factor
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        self.pool_factor[adapter_name] = factor
        self.merge_strategy[adapter_name] = config.merge_strategy
        self.scale_lr_ratio[adapter_name] = getattr(config, "scale_lr_ratio", 1.0)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.create_factors(adapter_name, config, n_groups)
        device = self.base_device()
        if getattr(config, "train_scales", False):
            self.qalora_scale[adapter_name] = nn.Parameter(torch.zeros(self.pool.n_groups, self.out_features,
                                                                       device=device))
        if getattr(config, "use_dora", False):
            self.qalora_magnitude[adapter_name] = nn.Parameter(torch.zeros(self.out_features, device=device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def create_factors(self, adapter_name: str, config, n_pool_groups: int) -> None:
        """The low-rank factors A (r, n_pool_groups) and B (out, r); none for a scales-only adapter."""
        if getattr(config, "scales_only", False):
            return
        device = self.base_device()
        self.qalora_A[adapter_name] = nn.Linear(n_pool_groups, config.r, bias=False, device=device)
        self.qalora_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False, device=device)
        self.reset_parameters(adapter_name, config.init_lora_weights)

    def has_factors(self, adapter_name: str) -> bool:
        return adapter_name in self.qalora_A

    def base_device(self) -> torch.device:
        """Where every tensor of this layer's adapters is made: the device of the base layer's packed codes."""
        return self.get_base_layer().qweight.device

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, n_pool_groups) and B (out, r) weights of the update `scaling * B A P(x)` (QA-VeRA overrides)."""
        return self.qalora_A[adapter_name].weight, self.qalora_B[adapter_name].weight

    def reset_parameters(self, adapter_name: str, init) -> None:
        A, B = self.qalora_A[adapter_name].weight, self.qalora_B[adapter_name].weight
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init is False:  # a non-identity adapter: tests and debugging
                nn.init.normal_(B, std=0.02)
            else:
                nn.init.zeros_(B)

    # --- the math -------------------------------------------------------------------------------

    def group_delta(self, adapter_name: str) -> torch.Tensor:
        """(n_quant_groups, out) float32 weight update of every quantization group (zeros: scales only)."""
        if not self.has_factors(adapter_name):
            return torch.zeros(self.pool.n_groups, self.out_features, device=self.base_device())
        A, B = self.factors(adapter_name)
        return group_delta(A, B, self.scaling[adapter_name], self.pool_factor[adapter_name])

    def integer_shift(self, adapter_name: str) -> torch.Tensor:
        """(n_quant_groups, out) zero shifts the merge will write, rounded straight-through."""
        cache = self.layer_cache()
        return RoundClampSTE.apply(self.group_delta(adapter_name) / cache.scales, cache.shift_min, cache.shift_max)

    def scales_ste(self, adapter_name: str) -> torch.Tensor:
        """(n_quant_groups, out) trained scales, rounded to fp16 straight-through, as the merge stores them."""
        scales, factor = self.layer_cache().scales, self.scale_factor(adapter_name)
        exact = scales * (1 + factor)
        return exact + (trained_scales(scales, factor.detach()).float() - exact.detach())

    def layer_cache(self) -> LayerCache:
        return self.cache.get(quant_tensors(self.get_base_layer()))

    def scale_factor(self, adapter_name: str) -> torch.Tensor:
        """(n_quant_groups, out) trained `c` in `s' = s * (1 + c)` (the parameter is `c / scale_lr_ratio`)."""
        return self.qalora_scale[adapter_name] * self.scale_lr_ratio[adapter_name]

    def group_terms(self, adapter_name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The adapter as per-group `(scales, delta)`: the adapted weight is `(q - z) * scales + delta`
        in every quantization group (scales None: the layer's own; delta None: no update). What `kernels`
        computes with. Exact adapters give `s' * (q - (z - k))`, `s'` rounded to fp16 as the merge stores it."""
        scales = self.scales_ste(adapter_name) if adapter_name in self.qalora_scale else None
        exact = self.merge_strategy[adapter_name] == "exact"
        shift = self.integer_shift(adapter_name) if exact and self.has_factors(adapter_name) else None
        if adapter_name in self.qalora_magnitude:
            return self.dora_terms(adapter_name, scales, shift)
        if shift is not None:
            return scales, (self.layer_cache().scales if scales is None else scales) * shift
        return scales, self.group_delta(adapter_name) if self.has_factors(adapter_name) and not exact else None

    def dora_terms(self, adapter_name: str, scales: torch.Tensor | None, shift: torch.Tensor | None):
        """QA-DoRA: `W'' = m * W' / ||W'||` per output column, `W'` the adapted weight. The column factor
        multiplies the scales, so it merges into them; the norm is detached (as peft's DoRA does) and comes from
        the code moments (`merge.zeros.column_norms`), never from a dense weight."""
        cache, moments = self.layer_cache(), self.moments()
        base = cache.scales if scales is None else scales
        magnitude = self.qalora_magnitude[adapter_name] * self.scale_lr_ratio[adapter_name]
        base_norms = self.base_norms()
        if shift is not None:  # exact: scales rounded to fp16 as the merge writes them (DoRA always has factors)
            norms = column_norms(moments, cache.zeros.float() - shift.detach(), base.detach())
            factor = (1 + magnitude) * (base_norms / norms).float()
            stored = dora_scales(base.detach(), dora_factor(magnitude.detach(), base_norms, norms)).float()
            exact = base * factor[None, :]
            scaled = exact + (stored - exact.detach())
            return scaled, scaled * shift
        delta = self.group_delta(adapter_name) if self.has_factors(adapter_name) else None
        norms = column_norms(moments, cache.zeros, base.detach(), None if delta is None else delta.detach())
        factor = ((1 + magnitude) * (base_norms / norms).float())[None, :]
        return base * factor, (None if delta is None else delta * factor)

    def base_norms(self) -> torch.Tensor:
        """(out,) float64 column norms of the base weight, kept until a merge or unmerge rewrites the layer."""
        cache = self.layer_cache()
        key, norms = self._base_norms
        if key != cache.key:
            norms = column_norms(self.moments(), cache.zeros, cache.scales)
            self._base_norms = (cache.key, norms)
        return norms

    def moments(self):
        """The base codes' per-group moments (`merge.CodeMoments`), for DoRA's column norms, computed on the
        codes' device and kept there (again after the model moves: they are not a buffer `.to()` would move)."""
        device = self.base_device()
        if self._moments is None or self._moments.sum_q.device != device:
            tensors = quant_tensors(self.get_base_layer())
            self._moments = code_moments(tensors.codes(), tensors.g_idx.to(device), tensors.n_groups)
        return self._moments

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's (..., out) contribution, or `result` plus it.

        With `result`, the plain adapter's last matmul, its scaling and the sum are one `addmm`: at
        r=16 the adapter's FLOPs are a few percent of the layer's, so the passes over the (..., out)
        activations are what it costs, and this saves two of them forward and one backward.
        """
        A, B = self.factors(adapter_name)
        x = self.lora_dropout[adapter_name](x.to(A.dtype))
        pooled = self.pool(x)  # (..., n_quant_groups)
        if self.merge_strategy[adapter_name] == "exact":
            scales = self.layer_cache().scales
            out = pooled @ (scales * self.integer_shift(adapter_name))  # (..., out)
            return out if result is None else result + out.to(result.dtype)
        factor = self.pool_factor[adapter_name]
        if factor > 1:
            pooled = pooled.unflatten(-1, (-1, factor)).sum(-1)  # (..., n_pool_groups)
        hidden = pooled @ A.T  # (..., r)
        if result is None or result.dtype != hidden.dtype:
            out = (hidden @ B.T) * self.scaling[adapter_name]
            return out if result is None else result + out.to(result.dtype)
        fused = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), B.T,
                            alpha=self.scaling[adapter_name])
        return fused.view(result.shape)

    # --- merging --------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, strategy: str | None = None):
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.r:
                continue
            tensors = quant_tensors(base)
            zeros = tensors.zeros()
            with torch.no_grad():
                new_zeros, stats = merge_zeros(
                    zeros,
                    tensors.scales,
                    self.group_delta(name),
                    tensors.bits,
                    strategy=strategy or self.merge_strategy[name],
                    hessian=self.pooled_hessian.get(name),
                )
                scale_delta = self.scale_factor(name) if name in self.qalora_scale else None
                magnitude = self.qalora_magnitude[name] * self.scale_lr_ratio[name] if name in self.qalora_magnitude else None
                moments = self.moments() if magnitude is not None else None
                scales = merged_scales(tensors.scales, zeros, new_zeros, scale_delta, magnitude, moments)
                self._before_merge.append((tensors.qzeros.detach().clone(), tensors.scales.detach().clone()))
                write_zeros(base, new_zeros)
                if scales is not None:
                    base.scales.copy_(scales)
            self.merge_stats[name] = stats
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the exact zeros held before each merge (rounding makes subtraction lossy)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            qzeros, scales = self._before_merge.pop()
            base.qzeros.copy_(qzeros)
            base.scales.copy_(scales)
            if hasattr(base, "clear_weight_cache"):
                base.clear_weight_cache()


class QALoraLinear(nn.Module, QALoraLayer):
    """Wraps one GPTQ quant linear (`base_layer`) with QA-LoRA adapters."""

    # With gradients on a CPU, compute the layer with `kernels` (base and adapter in one dequantize-and-matmul,
    # no float weight kept for backward; `q - z` from an int8 cache or unpacked from the packed codes at forward
    # and backward, per `kernels.set_code_cache` / $PEFT_QALORA_CODE_CACHE) instead of the loader's kernel.
    cpu_training_kernel: bool = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        QALoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.r]
        scaled = [n for n in names if n in self.qalora_scale or n in self.qalora_magnitude]
        if scaled and len(self.active_adapters) > 1:
            raise ValueError("QALoraLinear: an adapter with trained scales or DoRA must be the only active adapter.")
        if scaled or (self._on_training_kernel() and not self._dropout_active(names)):
            return self._adapted_weight_forward(x, names)
        result = self.base_forward(x, *args, **kwargs)
        for name in names:
            result = self.adapter_output(name, x, result)
        return result

    def _on_training_kernel(self) -> bool:
        on_cpu = self.get_base_layer().qweight.device.type == "cpu"
        return self.cpu_training_kernel and torch.is_grad_enabled() and on_cpu

    def _dropout_active(self, names: list[str]) -> bool:
        return self.training and any(isinstance(self.lora_dropout[n], nn.Dropout) for n in names)

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if not self._on_training_kernel():
            return base(x, *args, **kwargs)
        return gptq_linear_forward(self.cache, quant_tensors(base), x, getattr(base, "bias", None))

    def _adapted_weight_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Base and adapters as one weight, `(q - z) * scales + delta` per group (see `kernels`): one
        dequantization and one matmul, and no pass over the activations for the adapter itself.

        Exact adapters round every weight to fp16 as GPTQModel will from the merged checkpoint, so the
        trained model is the exported one; a float `delta` has no stored counterpart to match.
        """
        base = self.get_base_layer()
        scales, delta = None, None
        for name in names:
            name_scales, name_delta = self.group_terms(name)
            scales = name_scales if name_scales is not None else scales
            if name_delta is not None:
                delta = name_delta if delta is None else delta + name_delta
        exact = any(self.merge_strategy[n] == "exact" for n in names)
        return gptq_linear_forward(self.cache, quant_tensors(base), x, getattr(base, "bias", None),
                                   scales=scales, delta=delta, fp16_weight=exact or not names)

    def __repr__(self) -> str:
        return "qalora." + super().__repr__()


def pool_factor(group_size: int | None, quant_group_size: int, in_features: int, name: str = "") -> int:
    """Quantization groups per pooling group; raises when the pooling could never merge."""
    where = f" for {name}" if name else ""
    if group_size is None or group_size == quant_group_size:
        return 1
    if group_size % quant_group_size:
        raise ValueError(
            f"QALoraConfig: group_size={group_size} is not a whole multiple of the checkpoint's quantization group "
            f"size {quant_group_size}{where}: a pooled update that is not constant per quantization group can never "
            "merge into zero points. Leave group_size unset to use the checkpoint's, or pick a multiple of it."
        )
    if in_features % group_size:
        raise ValueError(
            f"QALoraConfig: group_size={group_size} does not divide in_features={in_features}{where}; "
            "pick a multiple of the quantization group size that divides every targeted layer's input size."
        )
    return group_size // quant_group_size
