"""`QAVeraLinear`: a QA-LoRA layer whose factors are VeRA's, `d * A` and `b * B` (see `projections.py`).

Everything else (group-pooled forward, `exact` integer shifts, trained scales, the CPU training kernel,
the in-memory merge) is `QALoraLayer`'s: it reaches the factors only through `create_factors`,
`has_factors` and `factors`, which this class overrides. The shared projections belong to the tuner
(`QAVeraModel`); a layer keeps a plain reference to them, so they are neither duplicated per layer in the
state dict nor trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..qalora.layer import QALoraLayer, QALoraLinear
from ...merge.projections import vera_factors


@dataclass
class SharedProjections:
    """The tuner's per-adapter `A` (r, n_pool_max) and `B` (out_max, r) buffers; a plain holder, not a module."""

    A: nn.Module  # peft BufferDict, keyed by adapter name
    B: nn.Module


def qalora_terms(config) -> SimpleNamespace:
    """What `QALoraLayer.update_layer` reads, in VeRA's terms: no alpha (scaling 1: b and d carry the scale),
    vera_dropout, never DoRA; plus VeRA's own init fields for `create_factors`."""
    return SimpleNamespace(r=config.r, lora_alpha=1.0, scaling=1.0, lora_dropout=config.vera_dropout,
                           group_size=config.group_size, merge_strategy=config.merge_strategy,
                           train_scales=config.train_scales, scale_lr_ratio=config.scale_lr_ratio, use_dora=False,
                           d_initial=config.d_initial, init_weights=config.init_weights)


class QAVeraLinear(QALoraLinear):
    """Wraps one GPTQ quant linear with QA-VeRA adapters: trained `d` (r,) and `b` (out,) per adapter."""

    adapter_layer_names = ("qavera_lambda_d", "qavera_lambda_b", "qalora_scale")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "pool_factor", "merge_strategy", "scale_lr_ratio")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, projections: SharedProjections,
                 **kwargs) -> None:
        nn.Module.__init__(self)
        QALoraLayer.__init__(self, base_layer)
        del self.qalora_A, self.qalora_B  # never used: the factors are d * A and b * B (create_factors, factors)
        self.qavera_lambda_d = nn.ParameterDict({})  # (r,) per adapter
        self.qavera_lambda_b = nn.ParameterDict({})  # (out,) per adapter
        self.projections = projections
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        super().update_layer(adapter_name, qalora_terms(config), **kwargs)

    def create_factors(self, adapter_name: str, config, n_pool_groups: int) -> None:
        A, B = self.projections.A[adapter_name], self.projections.B[adapter_name]
        if A.shape[0] != config.r or A.shape[1] < n_pool_groups or B.shape[0] < self.out_features:
            raise ValueError(
                f"QAVeraModel: the shared projections are A {list(A.shape)} and B {list(B.shape)} but this layer needs "
                f"r={config.r}, {n_pool_groups} pooled inputs and {self.out_features} outputs; they were made for other "
                "targets. Create the adapter with all its target_modules at once."
            )
        device = self.base_device()
        if config.init_weights:
            d = torch.full((config.r,), float(config.d_initial), device=device)
            b = torch.zeros(self.out_features, device=device)
        else:  # a non-identity adapter, as peft's VeRA with init_weights=False: tests and debugging
            d, b = torch.randn(config.r, device=device), torch.ones(self.out_features, device=device)
        self.qavera_lambda_d[adapter_name] = nn.Parameter(d)
        self.qavera_lambda_b[adapter_name] = nn.Parameter(b)

    def has_factors(self, adapter_name: str) -> bool:
        return adapter_name in self.qavera_lambda_d

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`d * A` (r, n_pool_groups) and `b * B` (out, r): the update `B_eff A_eff P(x)` at scaling 1."""
        n_pool = self.pool.n_groups // self.pool_factor[adapter_name]
        return vera_factors(self.projections.A[adapter_name], self.projections.B[adapter_name],
                            self.qavera_lambda_d[adapter_name], self.qavera_lambda_b[adapter_name], n_pool)

    def __repr__(self) -> str:
        return "qavera." + nn.Module.__repr__(self)
