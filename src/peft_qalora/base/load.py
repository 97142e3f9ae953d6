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

from ..gptq.tensors import QuantTensors, encode_zeros
from ..gptq.validate import Checkpoint, check_checkpoint, read_config
from ..names import GPTQ_SUFFIXES



def is_gptq_linear(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.Tensor) for n in GPTQ_SUFFIXES) and isinstance(
        getattr(module, "bits", None), int
    )


def gptq_linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_gptq_linear(module)]


def _module_zero_format(module: nn.Module) -> int:
    """The zero convention kept in memory (GPTQModel's torch kernel: 2); a folder's is `ckpt.zero_format_of`."""
    return module.qzero_format() if hasattr(module, "qzero_format") else 1


def quant_tensors(module: nn.Module) -> QuantTensors:
    """A view of the module's own tensors (no copies)."""
    return QuantTensors(
        qweight=module.qweight,
        qzeros=module.qzeros,
        scales=module.scales,
        g_idx=module.g_idx,
        bits=module.bits,
        zero_format=_module_zero_format(module),
    )


def write_zeros(module: nn.Module, zeros: torch.Tensor) -> None:
    """Store new true zeros into the module in the convention it keeps in memory."""
    if hasattr(module, "qzeros_data_v2") or hasattr(module, "qzeros_data_v1"):
        raise NotImplementedError(
            "quantized: this GPTQModel kernel keeps two copies of its zeros (v1 and v2); load the model with "
            "backend='gptq_torch' to merge in memory, or use the file-to-file merge."
        )
    packed = encode_zeros(zeros, module.bits, _module_zero_format(module))
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
    supports backward; transformers' default CPU kernel is inference-only. The folder is checked first
    (`gptq.validate`), no code from it ever runs (`trust_remote_code=False`), and the loaded model is
    checked against the files: every `*.qweight` became a GPTQ linear and transformers reports no
    missing or unused tensor, or this raises (transformers would otherwise hand back linears holding
    freshly initialised float weights, and say so only in a log line).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("quantized: trust_remote_code=True is refused: peft-qalora never runs code from a model "
                         "folder. Use a model whose architecture transformers ships.")
    checkpoint = check_checkpoint(path)
    _check_architecture(path)
    want_info = kwargs.pop("output_loading_info", False)
    if trainable:
        # The backend is a loading attribute of the checkpoint's own quantization_config; passing it as
        # `quantization_config=GPTQConfig(backend=...)` does the same but warns that the model already has one.
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, trust_remote_code=False)
        config.quantization_config = {**checkpoint.quant_config, "backend": "gptq_torch"}
        kwargs["config"] = config
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=kwargs.pop("device_map", "cpu"), trust_remote_code=False, use_safetensors=True,
        output_loading_info=True, **kwargs
    )
    check_loaded(model, info, checkpoint)
    use_eager_dequant(model)
    return (model, info) if want_info else model


def check_loaded(model: nn.Module, info: dict, checkpoint: Checkpoint) -> None:
    """Raise unless every quantized linear of the files was loaded as one and nothing was left out."""
    loaded = gptq_linear_names(model)
    problems = {
        "quantized linears of the files have no quantized module in the model":
            [n for n in checkpoint.layers if not any(_same_module(n, m) for m in loaded)],
        "weights were freshly initialised": sorted(info.get("missing_keys") or []),
        "stored tensors went unused": sorted(info.get("unexpected_keys") or []),
        "tensors had the wrong shape": sorted(str(k[0] if isinstance(k, tuple) else k)
                                              for k in info.get("mismatched_keys") or []),
    }
    found = [f"{len(names)} {what} (e.g. {names[0]})" for what, names in problems.items() if names]
    if found:
        raise ValueError(
            f"quantized: transformers did not load {checkpoint.folder} as stored: {'; '.join(found)}. The model would "
            f"compute with random weights: the tensor names in the files do not match the {type(model).__name__} "
            "that config.json describes. Check config.json's architectures and model_type, or download the "
            "checkpoint again."
        )


def _same_module(file_name: str, module_name: str) -> bool:
    """A layer of the files and a module of the model are the same up to a prefix transformers adds or drops."""
    return file_name == module_name or module_name.endswith("." + file_name) or file_name.endswith("." + module_name)


def _check_architecture(path: Path) -> None:
    from transformers import CONFIG_MAPPING

    model_type = read_config(path).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"quantized: {path}/config.json has model_type={model_type!r}, which transformers does not ship: its code "
            "would come from the folder, and peft-qalora never runs code from a model folder (trust_remote_code=False). "
            "Use a model of an architecture transformers supports, or upgrade transformers."
        )


def load_tokenizer(folder, owner: str):
    """The folder's tokenizer (never remote code); a broken tokenizer file becomes one message naming the folder's
    tokenizer files and the fix, not a parser's traceback without a file name."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as err:  # tokenizers' and transformers' parsers raise many types, none naming the file
        files = sorted(p.name for p in Path(folder).glob("*") if p.name.startswith(("tokenizer", "vocab", "merges",
                                                                                       "special_tokens")))
        raise ValueError(f"{owner}: cannot load the tokenizer of {folder} from {files or 'no tokenizer file'} "
                         f"({type(err).__name__}: {str(err)[:200]}); restore those files from the model's "
                         "source.") from None
