"""One GPTQ linear as plain tensors, and the zero-point conventions.

Design note. `W[i, o] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])` with `z` the TRUE zero.
What is stored in `qzeros` depends on the convention:
- v1 (`checkpoint_format: "gptq"`, what vLLM, ExLlamaV2 and Marlin read): the field holds `z - 1`
  and readers add 1 back per field; true zeros outside [1, 2^b - 1] are not portable.
- v2 (`"gptq_v2"`, and GPTQModel's torch kernel in memory): the field holds `z`.
GPTQModel converts v1 to v2 by adding 0x11111111 (4-bit) to whole packed words, so a v1 file that
was written with borrows (true zeros of 0 at low bits) is read one way by GPTQModel and another by
per-field readers. `zeros_as_gptqmodel_reads` and `zeros_as_per_field_readers` decode both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .packing import pack_cols, unpack_cols, unpack_rows, unpack_rows_u8

# Constant GPTQModel adds to each packed int32 word to turn v1 zeros into v2 (one 1 per field).
_V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def portable_zero_range(bits: int, zero_format: int = 1) -> tuple[int, int]:
    """Inclusive range of true zeros that every loader reads the same way."""
    return (1 if zero_format == 1 else 0), (1 << bits) - 1


def encode_zeros(zeros: torch.Tensor, bits: int, zero_format: int = 1) -> torch.Tensor:
    """True zeros (n_groups, out) -> packed qzeros, offset per field (never on packed words)."""
    low, high = portable_zero_range(bits, zero_format)
    zmin, zmax = (int(v) for v in torch.aminmax(zeros)) if zeros.numel() else (low, high)
    if zmin < low or zmax > high:
        raise ValueError(
            f"gptq: true zeros span [{zmin}, {zmax}] but a v{zero_format} checkpoint "
            f"can only hold [{low}, {high}] at {bits} bits; clamp them first."
        )
    fields = zeros.to(torch.int32) - 1 if zero_format == 1 else zeros.to(torch.int32)
    return pack_cols(fields, bits, check_range=False)  # in [low - 1, high - 1], inside the field: checked above


def zeros_as_per_field_readers(qzeros: torch.Tensor, bits: int, zero_format: int = 1) -> torch.Tensor:
    """True zeros the way vLLM and ExLlamaV2 read them: unpack, then add 1 per field (v1)."""
    return unpack_cols(qzeros, bits) + (1 if zero_format == 1 else 0)


def zeros_as_gptqmodel_reads(qzeros: torch.Tensor, bits: int, zero_format: int = 1) -> torch.Tensor:
    """True zeros the way GPTQModel and transformers read them (packed-word add for 2/4/8 bits)."""
    fields = unpack_cols(qzeros, bits)
    if zero_format == 2:
        return fields
    if bits == 3:  # GPTQModel shifts 3-bit fields one by one, modulo 8
        return fields.add_(1).bitwise_and_(7)
    if not fields.numel() or int(fields.max()) < (1 << bits) - 1:  # no field can carry: a per-field add
        return fields.add_(1)
    words = (qzeros.to(torch.int64) + _V1_WORD_OFFSET[bits]) & 0xFFFFFFFF
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return unpack_cols(words, bits)


def true_zero_words(qzeros: torch.Tensor, bits: int, zero_format: int, out_features: int) -> torch.Tensor | None:
    """The true zeros GPTQModel reads, packed along the outputs as qzeros are: `pack_cols(zeros_as_gptqmodel_reads(
    ...)[:, :out_features])` without unpacking a field. v2 words already are that; v1 words become it by GPTQModel's
    own word add (which is what it reads). None where no word-level form exists: 3 bits (fields straddle words)
    or outputs that do not fill whole words."""
    per_word = 32 // bits
    if bits not in _V1_WORD_OFFSET or out_features % per_word:
        return None
    words = qzeros[:, : out_features // per_word]
    if zero_format == 2:
        return words
    wide = (words.to(torch.int64) + _V1_WORD_OFFSET[bits]) & 0xFFFFFFFF
    return torch.where(wide >= 1 << 31, wide - (1 << 32), wide).to(torch.int32)


@dataclass
class QuantTensors:
    """The tensors of one GPTQ linear, `[in, out]` orientation as stored on disk.

    Args:
        qweight: int32 (in * bits / 32, out), codes packed along the input dim.
        qzeros: int32 (n_groups, out * bits / 32), zero fields packed along the output dim.
        scales: (n_groups, out), float16 in checkpoints.
        g_idx: int32 (in,), the group of every input row.
        bits: 2, 3, 4 or 8.
        zero_format: 1 (field = z - 1) or 2 (field = z).
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    zero_format: int = 1

    @property
    def in_features(self) -> int:
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def group_size(self) -> int:
        return self.in_features // self.n_groups

    def codes(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """(in, out) integer codes; `dtype=torch.uint8` unpacks straight to bytes (a quarter of the memory)."""
        if dtype == torch.uint8:
            return unpack_rows_u8(self.qweight, self.bits)[: self.in_features]
        return unpack_rows(self.qweight, self.bits)[: self.in_features].to(dtype)

    def zeros(self) -> torch.Tensor:
        """(n_groups, out) true zeros, as GPTQModel (the loader we train with) reads them."""
        return zeros_as_gptqmodel_reads(self.qzeros, self.bits, self.zero_format)[:, : self.out_features]

    def dequantize(self, zeros: torch.Tensor | None = None) -> torch.Tensor:
        """(out, in) float32 weight, as nn.Linear holds it; `zeros` overrides the stored ones."""
        zeros = self.zeros() if zeros is None else zeros
        g = self.g_idx.long()
        scales = self.scales.float()[g]  # (in, out)
        weight = scales * (self.codes().float() - zeros.float()[g])  # (in, out)
        return weight.T.contiguous()

    def with_zeros(self, zeros: torch.Tensor, zero_format: int = 1) -> "QuantTensors":
        """A copy holding new true zeros; codes, scales and g_idx are shared, untouched."""
        return replace(self, qzeros=encode_zeros(zeros, self.bits, zero_format), zero_format=zero_format)
