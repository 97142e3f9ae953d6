"""peft-qalora: QA-LoRA on GPTQ models for Hugging Face peft.

`import peft_qalora` registers the QALORA and QAVERA methods with peft; then `get_peft_model`,
`PeftModel.from_pretrained` and `save_pretrained` work as they do for LoRA. Importing the package is
cheap: it imports nothing of peft, transformers or torch, and the names below load on first use, so the
file-to-file merge never pays for them.

Registration waits for peft. Importing peft pulls in transformers (~7 s, ~0.9 GB), which the merge and the
CLI's help never need. The methods register themselves when `peft_qalora.tuners` is imported (each method's
`__init__` ends with its `register(...)` call, as peft's tuners do). So if peft is already imported, this
imports `tuners` now; otherwise it leaves a one-shot import hook that imports `tuners` right after peft's
own import finishes, unless that import is what is importing peft: then its last lines register.
"""

import importlib.abc
import importlib.util
import sys
from importlib import import_module

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
    "instruction_dataset": "training.instruction",
    "pad_collator": "training.instruction",
    "save_quantized": "base.save",
    "export": "exports",
    "export_lora": "exports.lora",
    "export_gguf": "exports.gguf",
    "merge_gguf": "exports.gguf",
}
__all__ = sorted(_EXPORTS)


def _import_tuners() -> None:
    """Import the peft methods (they register themselves), unless that import is already under way."""
    if f"{__name__}.tuners" not in sys.modules:
        import_module(".tuners", __name__)


class _AfterPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps peft's own loader so `_import_tuners` runs once peft is fully imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        index = sys.meta_path.index(self)
        sys.meta_path.remove(self)  # keeps the lookup below from finding us again
        try:
            spec = importlib.util.find_spec("peft")
        finally:  # a probe is not an import: trl and transformers ask `importlib.util.find_spec("peft")` at import
            sys.meta_path.insert(index, self)
        if spec is None or spec.loader is None:
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # one shot: peft is being imported now
            exec_peft(module)
            _import_tuners()

        spec.loader.exec_module = exec_module
        return spec


if "peft" in sys.modules:
    _import_tuners()
elif not any(isinstance(finder, _AfterPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterPeft())


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
