"""The GPTQ checkpoint format as pure tensors and files: no peft, no transformers."""

from .packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from .tensors import (
    QuantTensors,
    encode_zeros,
    portable_zero_range,
    zeros_as_gptqmodel_reads,
    zeros_as_per_field_readers,
)

__all__ = [
    "QuantTensors",
    "encode_zeros",
    "pack_cols",
    "pack_rows",
    "portable_zero_range",
    "unpack_cols",
    "unpack_rows",
    "zeros_as_gptqmodel_reads",
    "zeros_as_per_field_readers",
]
