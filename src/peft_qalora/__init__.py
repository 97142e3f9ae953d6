"""peft-qalora: QA-LoRA on GPTQ models for Hugging Face peft.

`import peft_qalora` registers the QALORA and QAVERA methods with peft; then `get_peft_model`,
`PeftModel.from_pretrained` and `save_pretrained` work as they do for LoRA. Importing the package is
cheap: peft is registered with as soon as it is imported (see `registry.py`), and the names below
load on first use, so the file-to-file merge never pays for peft and transformers.
"""

from importlib import import_module

from .tuners.registration import register_when_peft_loads as _register_when_peft_loads

__version__ = "0.1.0"

_EXPORTS = {
    "QALoraConfig": "tuners.qalora.config",
    "QALoraLayer": "tuners.qalora.layer",
    "QALoraLinear": "tuners.qalora.layer",
    "QALoraModel": "tuners.qalora.model",
    "QAVeraConfig": "tuners.qavera.config",
    "QAVeraLinear": "tuners.qavera.layer",
    "QAVeraModel": "tuners.qavera.model",
    "load_gptq_model": "base.load",
    "use_eager_dequant": "base.load",
    "prepare_model_for_training": "base.prepare",
    "save_quantized": "base.save",
    "export": "export",
    "export_lora": "export.lora",
    "export_gguf": "export.gguf.q4_1",
    "merge_gguf": "export.gguf.q4_1",
}
__all__ = sorted(_EXPORTS)

_register_when_peft_loads()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
