"""The one place that teaches peft about QA-LoRA and QA-VeRA.

peft's `register_peft_method` only accepts names already present in its `PeftType` enum, and that
enum is closed. We add one member per method, `PeftType.QALORA` and `PeftType.QAVERA`, the way `enum`
itself builds members (same name, value, maps and class attribute), then call peft's public
`register_peft_method`. Every other part of peft (`get_peft_model`, `PeftConfig.from_pretrained`,
`PeftModel.from_pretrained`, `save_pretrained`) then looks them up through its ordinary mappings. The test suite checks the
round trip against the installed peft, so a peft release that changes this breaks loudly.

Why registration waits for peft. Importing peft pulls in transformers and bitsandbytes (~7 s, ~0.9
GB), which the file-to-file merge and the CLI's help never need. So `import peft_qalora` registers
at once only if peft is already imported; otherwise it leaves a one-shot import hook that registers
right after peft's own import finishes. If peft was imported from inside one of our modules, the
classes `register()` needs may be half-built; it then waits, and the modules that import peft
(config, layer, model, and qavera's) call `register_if_waiting()` as their last line; a test imports each first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

PEFT_TYPE_NAME = "QALORA"
PREFIX = "qalora_"
QAVERA_TYPE_NAME = "QAVERA"
QAVERA_PREFIX = "qavera_"


def _add_enum_member(enum_cls, name: str):
    """Add `name` (value == name) to a closed `(str, Enum)` class, idempotently."""
    if name in enum_cls._member_map_:
        return enum_cls._member_map_[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    type.__setattr__(enum_cls, name, member)
    return member


def register() -> None:
    """Register QA-LoRA and QA-VeRA with peft (safe to call more than once)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import PeftType, register_peft_method

    from .qalora.config import QALoraConfig
    from .qalora.model import QALoraModel
    from .qavera.config import QAVeraConfig
    from .qavera.model import QAVeraModel

    methods = ((PEFT_TYPE_NAME, PREFIX, QALoraConfig, QALoraModel),
               (QAVERA_TYPE_NAME, QAVERA_PREFIX, QAVeraConfig, QAVeraModel))
    for name, prefix, config_cls, model_cls in methods:
        peft_type = _add_enum_member(PeftType, name)
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def register_when_peft_loads() -> None:
    """Register now if peft is imported, else right after peft's import (see the module docstring)."""
    if "peft" in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())


_waiting = False


def _register_or_wait() -> None:
    global _waiting
    try:
        register()
        _waiting = False
    except ImportError:  # "partially initialized module": one of our classes is not defined yet
        _waiting = True


def register_if_waiting() -> None:
    """The last line of each of our modules that imports peft: finish a registration the hook deferred."""
    if _waiting:
        _register_or_wait()


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps peft's own loader so `register()` runs when peft is fully imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):
            exec_peft(module)
            _register_or_wait()

        spec.loader.exec_module = exec_module
        return spec
