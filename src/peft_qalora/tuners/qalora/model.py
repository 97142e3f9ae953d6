"""`QALoraModel`: the peft tuner that puts QA-LoRA layers on a GPTQ model."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ...merge.adapters import check_loaded_adapter
from .config import QALoraConfig
from ...gptq.validate import PER_CHANNEL
from .layer import QALoraLayer, QALoraLinear
from ...base.load import gptq_linear_names, is_gptq_linear, quant_tensors
from ...names import MERGE_STRATEGIES, QALORA_PREFIX


def base_quantization(model: nn.Module) -> dict:
    """Bits, group sizes and act-order of a model's GPTQ linears, as recorded in adapter configs."""
    bits, group_sizes, act_order = set(), set(), False
    for name in gptq_linear_names(model):
        tensors = quant_tensors(model.get_submodule(name))
        bits.add(tensors.bits)
        group_sizes.add(tensors.group_size)
        g_idx = tensors.g_idx.long()
        act_order |= not torch.equal(g_idx, torch.arange(g_idx.numel(), device=g_idx.device) // tensors.group_size)
    return {"bits": sorted(bits), "group_size": sorted(group_sizes), "act_order": act_order}


class QALoraModel(BaseTuner):
    """Adds QA-LoRA adapters to the GPTQ linears of a model (see `QALoraConfig`).

    Example:
        >>> import peft_qalora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(gptq_model, peft_qalora.QALoraConfig(r=16, target_modules="all-linear"))
    """

    prefix: str = QALORA_PREFIX
    tuner_layer_cls = QALoraLayer
    target_module_mapping: dict = {}

    def _pre_injection_hook(self, model: nn.Module, config: QALoraConfig, adapter_name: str) -> None:
        if not gptq_linear_names(model):
            raise ValueError(
                "QALoraModel: the model has no GPTQ quantized linear layers. Load a GPTQ checkpoint (see "
                "`peft_qalora.load_gptq_model`) or make one with `peft-qalora quantize`."
            )
        names = gptq_linear_names(model)
        if all(quant_tensors(model.get_submodule(n)).n_groups == 1 for n in names):
            raise ValueError(f"QALoraModel: the model {PER_CHANNEL}.")
        found = base_quantization(model)
        if config.base_quantization is not None and config.base_quantization != found:
            raise ValueError(
                f"QALoraModel: adapter '{adapter_name}' was trained on a base quantized with "
                f"{config.base_quantization} but this model is quantized with {found}. Load the adapter onto the "
                "GPTQ checkpoint it was trained on."
            )
        config.base_quantization = found

    def _prepare_adapter_config(self, peft_config: QALoraConfig, model_config: dict) -> QALoraConfig:
        targets = peft_config.target_modules
        if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
            # a layer already wrapped by an adapter is targeted by its wrapper's name
            peft_config.target_modules = {n.removesuffix(".base_layer") for n in gptq_linear_names(self.model)}
        elif isinstance(targets, (set, list)):
            self._check_names_exist(set(targets))
        return peft_config

    def _check_names_exist(self, targets: set[str]) -> None:
        names = [n for n, _ in self.model.named_modules()]
        missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in gptq_linear_names(self.model)})
            raise ValueError(
                f"QALoraConfig: target_modules {missing} match no module of the model. Quantized linears here are "
                f"named {suffixes}; use those, or target_modules='all-linear'."
            )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, QALoraLinear):
            target.update_layer(adapter_name, config, name=current_key)
            return
        if not is_gptq_linear(target):
            raise ValueError(
                f"QALoraConfig: target {current_key} is a {type(target).__name__}, not a GPTQ quantized linear; "
                "QA-LoRA only adapts quantized layers (a plain LoRA there could not merge into the checkpoint). "
                "Remove it from target_modules or use target_modules='all-linear'."
            )
        new_module = QALoraLinear(target, adapter_name, config, name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, QALoraLayer) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)  # unloading: GPTQ kernels have a read-only `weight`
            return
        super()._replace_module(parent, child_name, new_module, child)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, strategy=None):
        """Fold the adapters into the GPTQ zeros and return the base model, still quantized.

        Args:
            strategy: overrides each adapter's `merge_strategy` ("nearest", "calibrated", "exact").
        """
        with _merge_strategy(self, strategy):
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False, strategy=None) -> None:
        with _merge_strategy(self, strategy):
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_stats(self) -> dict:
        """Per-layer statistics of the last merge, keyed by module name."""
        return {
            name: stats
            for name, module in self.model.named_modules()
            if isinstance(module, QALoraLayer)
            for stats in module.merge_stats.values()
        }

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        source = getattr(config, "loaded_from", None) or "being loaded"
        check_loaded_adapter(model.state_dict(), remapped, adapter_name, source)  # missing, extra, shapes, NaN/Inf
        return remapped


class _merge_strategy:
    """Temporarily override every layer's merge strategy."""

    def __init__(self, tuner: QALoraModel, strategy: str | None):
        if strategy is not None and strategy not in MERGE_STRATEGIES:
            raise ValueError(f"merge: unknown strategy {strategy!r}; expected one of {MERGE_STRATEGIES}.")
        self.strategy = strategy
        self.layers = [m for m in tuner.model.modules() if isinstance(m, QALoraLayer)]
        self.saved = []

    def __enter__(self):
        if self.strategy is not None:
            for layer in self.layers:
                self.saved.append(dict(layer.merge_strategy))
                layer.merge_strategy.update({k: self.strategy for k in layer.merge_strategy})

    def __exit__(self, *exc):
        for layer, saved in zip(self.layers, self.saved):
            layer.merge_strategy.clear()
            layer.merge_strategy.update(saved)
