"""QA-VeRA: VeRA's shared random projections on the group-pooled input of a GPTQ model, merged into zeros.

One folder per method, as peft keeps them: `config.py` (`QAVeraConfig`), `layer.py` (`QAVeraLinear`, a
`QALoraLinear` whose factors are `d * A` and `b * B`), `model.py` (`QAVeraModel`, the tuner that owns the
shared projections) and `projections.py` (the projections themselves, torch only, so the file-to-file merge
can rebuild them from the PRNG key without importing peft). Registration with peft is `registry.py`'s; the
names below load on first use, so importing `peft_qalora.merge.projections` never pulls in peft.
"""

from importlib import import_module

_EXPORTS = {"QAVeraConfig": "config", "QAVeraLinear": "layer", "QAVeraModel": "model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
