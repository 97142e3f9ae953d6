"""The one place that teaches peft about QA-LoRA.

peft's `register_peft_method` only accepts names already present in its `PeftType` enum, and that
enum is closed. We add one member, `PeftType.QALORA`, the way `enum` itself builds members (same
name, value, maps and class attribute), then call peft's public `register_peft_method`. Every other
part of peft (`get_peft_model`, `PeftConfig.from_pretrained`, `PeftModel.from_pretrained`,
`save_pretrained`) then looks QA-LoRA up through its ordinary mappings. The test suite checks the
round trip against the installed peft, so a peft release that changes this breaks loudly.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType, register_peft_method

PEFT_TYPE_NAME = "QALORA"
PREFIX = "qalora_"


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
    """Register QA-LoRA with peft (safe to call more than once)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import QALoraConfig
    from .model import QALoraModel

    peft_type = _add_enum_member(PeftType, PEFT_TYPE_NAME)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=QALoraConfig, model_cls=QALoraModel, prefix=PREFIX)
