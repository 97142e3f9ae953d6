"""`QAVeraModel`: the peft tuner for QA-VeRA; owns the shared projections, one pair per adapter."""

from __future__ import annotations

from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...merge.adapters import TENSOR_NAMES, check_loaded_adapter
from ..qalora.layer import pool_factor
from ..qalora.model import QALoraModel
from ...base.load import gptq_linear_names, is_gptq_linear, quant_tensors
from ...names import QAVERA_PREFIX
from .config import QAVeraConfig
from .layer import QAVeraLinear, SharedProjections
from ...merge.projections import shared_projections


class QAVeraModel(QALoraModel):
    """Adds QA-VeRA adapters to the GPTQ linears of a model (see `QAVeraConfig`).

    `qavera_A[adapter]` (r, n_pool_max) and `qavera_B[adapter]` (out_max, r) are buffers of this module,
    generated from the adapter's `projection_prng_key` and saved with it when `save_projection` (peft's
    `VeraModel` keeps `vera_A` / `vera_B` the same way); every layer reads its slice of them.

    Example:
        >>> import peft_qalora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(gptq_model, peft_qalora.QAVeraConfig(r=256))
    """

    prefix: str = QAVERA_PREFIX
    tuner_layer_cls = QAVeraLinear
    uses_shared_state: bool = True

    def _pre_injection_hook(self, model: nn.Module, config: QAVeraConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        self.qavera_A = BufferDict({}, persistent=config.save_projection)
        self.qavera_B = BufferDict({}, persistent=config.save_projection)

    def _check_new_adapter_config(self, config: QAVeraConfig) -> None:
        super()._check_new_adapter_config(config)
        saves = {c.save_projection for c in self.peft_config.values()}
        if len(saves) > 1:
            raise ValueError("QAVeraConfig: save_projection must be the same for every adapter of a model (got both "
                             "True and False): the projections are stored, or not, for all of them.")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if adapter_name not in self.qavera_A:
            self._make_projections(config, adapter_name)
        if isinstance(target, QAVeraLinear):
            target.update_layer(adapter_name, config, name=current_key)
            return
        if not is_gptq_linear(target):
            raise ValueError(
                f"QAVeraConfig: target {current_key} is a {type(target).__name__}, not a GPTQ quantized linear; "
                "QA-VeRA only adapts quantized layers. Remove it from target_modules or use target_modules='all-linear'."
            )
        projections = SharedProjections(self.qavera_A, self.qavera_B)
        new_module = QAVeraLinear(target, adapter_name, config, projections, name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _make_projections(self, config: QAVeraConfig, adapter_name: str) -> None:
        """Generate A and B from the key at the widest targeted layer's shape, recorded in the config."""
        shape = self.projection_shape(config)
        if config.projection_shape is not None and list(config.projection_shape) != shape:
            raise ValueError(
                f"QAVeraModel: adapter '{adapter_name}' was made with projections for {config.projection_shape} "
                f"(pooled inputs, outputs) but its targets here need {shape}: another base or other targets. Load it "
                "onto the GPTQ checkpoint it was trained on."
            )
        config.projection_shape = shape
        A, B = shared_projections(config.projection_prng_key, config.r, *shape)
        device = quant_tensors(self.model.get_submodule(gptq_linear_names(self.model)[0])).scales.device
        self.qavera_A[adapter_name] = A.to(device)
        self.qavera_B[adapter_name] = B.to(device)

    def projection_shape(self, config: QAVeraConfig) -> list[int]:
        """[pooled inputs, outputs] of the widest targeted GPTQ linear (each maximised on its own)."""
        n_pool, out = 0, 0
        for name in gptq_linear_names(self.model):
            key = name.removesuffix(".base_layer")
            if not self._check_target_module_exists(config, key):
                continue
            tensors = quant_tensors(self.model.get_submodule(name))
            factor = pool_factor(config.group_size, tensors.group_size, tensors.in_features, key)
            n_pool, out = max(n_pool, tensors.n_groups // factor), max(out, tensors.out_features)
        if not out:
            raise ValueError(f"QAVeraConfig: target_modules={config.target_modules!r} match no GPTQ linear of the "
                             "model; use target_modules='all-linear' or the names of its quantized linears.")
        return [n_pool, out]

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super(QALoraModel, cls)._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        source = getattr(config, "loaded_from", None) or "being loaded"
        names = TENSOR_NAMES["QAVERA"] + (("qavera_A", "qavera_B") if config.save_projection else ())
        check_loaded_adapter(model.state_dict(), remapped, adapter_name, source, names)
        return remapped
