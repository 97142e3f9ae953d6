"""Teaching peft a new method: the one place that touches peft's registry.

peft's `register_peft_method` only accepts names already present in its `PeftType` enum, and that
enum is closed. `register` adds the member (`PeftType.QALORA`, `PeftType.QAVERA`) the way `enum`
itself builds members (same name, value, maps and class attribute), then calls peft's public
`register_peft_method`. Every other part of peft (`get_peft_model`, `PeftConfig.from_pretrained`,
`PeftModel.from_pretrained`, `save_pretrained`) then looks the method up through its ordinary mappings.
The test suite checks the round trip against the installed peft, so a peft release that changes this
breaks loudly. Each method's package calls `register` as its last line, as peft's own tuners do.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.peft_types import PeftType, register_peft_method


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


def register(name: str, prefix: str, config_cls: type, model_cls: type) -> None:
    """Register a method with peft as `PeftType.<name>` (safe to call more than once)."""
    peft_type = _add_enum_member(PeftType, name)
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
