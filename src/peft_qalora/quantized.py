"""Finding GPTQ linears in a model and reading or writing their tensors.

A GPTQ linear is recognised by what it holds (qweight, qzeros, scales, g_idx, bits), not by a
list of kernel classes: GPTQModel's `BaseQuantLinear` subclasses (what transformers 5 loads GPTQ
checkpoints into) and AutoGPTQ-style modules alike. GPTQModel's torch kernel keeps zeros in the v2
convention in memory (`qzero_format() == 2`); modules without that method are taken as v1.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .gptq.tensors import QuantTensors, encode_zeros

GPTQ_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


def is_gptq_linear(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.Tensor) for n in GPTQ_TENSOR_NAMES) and isinstance(
        getattr(module, "bits", None), int
    )


def gptq_linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_gptq_linear(module)]


def zero_format_of(module: nn.Module) -> int:
    return module.qzero_format() if hasattr(module, "qzero_format") else 1


def quant_tensors(module: nn.Module) -> QuantTensors:
    """A view of the module's own tensors (no copies)."""
    return QuantTensors(
        qweight=module.qweight,
        qzeros=module.qzeros,
        scales=module.scales,
        g_idx=module.g_idx,
        bits=module.bits,
        zero_format=zero_format_of(module),
    )


def write_zeros(module: nn.Module, zeros: torch.Tensor) -> None:
    """Store new true zeros into the module in the convention it keeps in memory."""
    if hasattr(module, "qzeros_data_v2") or hasattr(module, "qzeros_data_v1"):
        raise NotImplementedError(
            "quantized: this GPTQModel kernel keeps two copies of its zeros (v1 and v2); load the model with "
            "backend='gptq_torch' to merge in memory, or use the file-to-file merge."
        )
    packed = encode_zeros(zeros, module.bits, zero_format_of(module))
    module.qzeros.copy_(packed.to(module.qzeros.device))
    if hasattr(module, "clear_weight_cache"):
        module.clear_weight_cache()


def supports_training(module: nn.Module) -> bool:
    return bool(getattr(module, "SUPPORTS_TRAINING", True))


def use_eager_dequant(model: nn.Module) -> int:
    """Undo GPTQModel's torch.compile of `dequantize_weight` on its torch kernel.

    GPTQModel compiles the dequantization lazily, at the first forward: ~60-100 s of C++ compiling
    on a CPU, paid again in every new process. The eager version is exact and, at the sizes we train
    on a CPU, costs little per step. Returns how many modules were switched.
    """
    switched = 0
    for module in model.modules():
        if is_gptq_linear(module) and "dequantize_weight" in vars(module):
            del module.dequantize_weight  # the instance attribute shadows the class's eager method
            switched += 1
    return switched


def load_gptq_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, trainable: bool = True, **kwargs):
    """Load a GPTQ checkpoint with transformers + GPTQModel on the CPU-trainable torch kernel.

    `trainable=True` picks GPTQModel's `TorchLinear` (`backend="gptq_torch"`), the CPU kernel that
    supports backward; transformers' default CPU kernel is inference-only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = _read_quant_config(Path(path))
    if trainable:
        # The backend is a loading attribute of the checkpoint's own quantization_config; passing it as
        # `quantization_config=GPTQConfig(backend=...)` does the same but warns that the model already has one.
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
        config.quantization_config = {**quant, "backend": "gptq_torch"}
        kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=kwargs.pop("device_map", "cpu"), **kwargs
    )
    use_eager_dequant(model)
    return model


def _read_quant_config(path: Path) -> dict:
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"quantized: {path} has no config.json; pass the folder of a GPTQ checkpoint.")
    quant = json.loads(config_file.read_text()).get("quantization_config")
    if not quant or quant.get("quant_method") != "gptq":
        raise ValueError(
            f"quantized: {path} is not a GPTQ checkpoint (quantization_config.quant_method is "
            f"{(quant or {}).get('quant_method')!r}); quantize it first with `peft-qalora quantize`."
        )
    return quant
