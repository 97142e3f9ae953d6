"""The GPTQ checkpoint format as pure tensors and files: no peft, no transformers.

The names below load on first use, so `gptq.validate` (stdlib and numpy) never imports torch.
"""

from importlib import import_module

_EXPORTS = {
    "QuantTensors": "tensors",
    "encode_zeros": "tensors",
    "pack_cols": "packing",
    "pack_rows": "packing",
    "portable_zero_range": "tensors",
    "unpack_cols": "packing",
    "unpack_rows": "packing",
    "zeros_as_gptqmodel_reads": "tensors",
    "zeros_as_per_field_readers": "tensors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
