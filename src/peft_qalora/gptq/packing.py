"""Bit packing of GPTQ integer codes into int32 words (``qweight`` / ``qzeros``).

Design note
-----------
GPTQ stores ``bits``-bit codes in 32-bit words. ``qweight`` (``[in, out]`` codes)
is packed along dim 0 (the input rows), ``qzeros`` (``[n_groups, out]`` zero points)
along dim 1 (the output columns). Both use one rule, applied along the packed axis:

* Consecutive values form a little-endian bitstream: value ``j`` of a block sits at
  bit offset ``bits * j`` of the block's words concatenated low word first.
  A block is the smallest run of values that fills whole words:
  ``32 // gcd(32, bits)`` values -> ``bits // gcd(32, bits)`` words.
* 2/4/8 bits: a block is ``pf = 32 // bits`` values in ONE word. Word ``k`` holds
  values ``k*pf .. k*pf + pf - 1``; value ``j`` at bits ``[bits*j, bits*j + bits)``,
  i.e. the first value in the lowest bits (4-bit ``[1..8]`` -> ``0x87654321``).
* 3 bits: a block is 32 values in THREE words (96 bits). Two values straddle a word
  boundary:
    - value 10: its bits 0-1 are word0 bits 30-31, its bit 2 is word1 bit 0;
    - value 21: its bit 0 is word1 bit 31, its bits 1-2 are word2 bits 0-1.
  So word0 holds values 0-9 at ``3*i``, word1 values 11-20 at ``1 + 3*i``, word2
  values 22-31 at ``2 + 3*i``: exactly GPTQModel's "10 | 1 | 10 | 1 | 10" layout
  (``utils/model_dequant.py``: ``_pack_cols_3bit``/``_unpack_rows_3bit``;
  ``nn_modules/qlinear/__init__.py``: ``pack_block``). Hence 3-bit needs the
  packed dimension divisible by 32 (not merely by 3 or by some ``pf``).
* Words are SIGNED int32 (two's complement), as GPTQModel stores them: a word with
  bit 31 set is negative (4-bit all-15 -> ``-1``). Packing works in int32, whose
  ``<<`` wraps modulo 2**32 in torch; unpacking masks after every (arithmetic) ``>>``,
  so sign extension never leaks into a value.

Values must already be codes in ``[0, 2**bits)``; nothing is clamped silently.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch

from ..names import SUPPORTED_BITS

__all__ = ["pack_rows", "unpack_rows", "unpack_rows_u8", "pack_cols", "unpack_cols"]

_WORD_BITS = 32


def _block(bits: int) -> tuple[int, int, int]:
    """(bits as int, values per block, int32 words per block) for a supported width."""
    is_int = isinstance(bits, numbers.Integral) and not isinstance(bits, bool)
    if not is_int or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"gptq.packing: bits={bits!r} is not supported; use one of 2, 3, 4 or 8 "
            "(the widths GPTQ checkpoints store in 32-bit words)."
        )
    g = math.gcd(_WORD_BITS, int(bits))
    return int(bits), _WORD_BITS // g, int(bits) // g


def _check_matrix(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"gptq.packing: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != 2:
        raise ValueError(
            f"gptq.packing: {name} must be 2-D (rows, cols), got shape {tuple(t.shape)}; "
            "reshape it to a matrix first."
        )


def _check_values(values: torch.Tensor, bits: int, axis: int, fn: str,
                  check_range: bool = True) -> tuple[int, int, int]:
    bits, n_vals, n_words = _block(bits)
    _check_matrix(values, "values")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(
            f"gptq.packing: {fn} needs integer codes, got dtype {values.dtype}; "
            "round and convert them first, e.g. values.round().to(torch.int32)."
        )
    size = values.shape[axis]
    if size % n_vals:
        dim = "rows" if axis == 0 else "cols"
        raise ValueError(
            f"gptq.packing: {fn} with {bits}-bit needs {dim} divisible by {n_vals}, got {size}; "
            f"pad that dimension to a multiple of {n_vals}."
        )
    if check_range and values.numel():
        lo, hi = torch.aminmax(values)
        if lo.item() < 0 or hi.item() >= (1 << bits):
            raise ValueError(
                f"gptq.packing: {bits}-bit codes must lie in [0, {(1 << bits) - 1}], found "
                f"min {lo.item()} and max {hi.item()}; clamp or requantize the codes "
                "before packing."
            )
    return bits, n_vals, n_words


def _check_packed(packed: torch.Tensor, bits: int, axis: int, fn: str) -> tuple[int, int, int]:
    bits, n_vals, n_words = _block(bits)
    _check_matrix(packed, "packed")
    if packed.dtype != torch.int32:
        raise ValueError(
            f"gptq.packing: {fn} needs int32 words (GPTQ pack_dtype), got dtype {packed.dtype}; "
            "load qweight/qzeros as stored, or convert with .to(torch.int32)."
        )
    size = packed.shape[axis]
    if size % n_words:
        dim = "rows" if axis == 0 else "cols"
        raise ValueError(
            f"gptq.packing: {fn} with {bits}-bit needs packed {dim} divisible by {n_words} "
            f"(32 values = {n_words} words), got {size}; the tensor is truncated or not {bits}-bit."
        )
    return bits, n_vals, n_words


def _layout(bits: int, n_vals: int, dim: int, ndim: int, device) -> tuple:
    """Block layout: per-position shift tensor (broadcastable along ``dim``), the
    ``[lo, hi)`` positions starting in each word, and the straddling positions."""
    offsets = [bits * j for j in range(n_vals)]  # bit offset of value j in the block's stream
    view = [1] * ndim
    view[dim] = n_vals
    shift = torch.tensor([o % _WORD_BITS for o in offsets], dtype=torch.int32, device=device)
    words = [o // _WORD_BITS for o in offsets]
    segments = [(words.index(w), n_vals - words[::-1].index(w)) for w in sorted(set(words))]
    straddlers = [j for j, o in enumerate(offsets) if o % _WORD_BITS + bits > _WORD_BITS]
    return shift.view(view), segments, straddlers


def _pack_blocks(blocks: torch.Tensor, bits: int, n_words: int, dim: int) -> torch.Tensor:
    """Pack the ``n_vals`` codes along ``dim`` of ``blocks`` into ``n_words`` int32 words."""
    n_vals = blocks.shape[dim]
    shift, segments, straddlers = _layout(bits, n_vals, dim, blocks.dim(), blocks.device)
    v = blocks.to(torch.int32)
    # int32 << wraps modulo 2**32 (torch shifts as unsigned): a field reaching bit 31 makes
    # the word negative, as GPTQModel stores it; a straddler's high bits fall off here ...
    shifted = v << shift  # same shape as blocks
    # Fields of one word are disjoint, so their sum is their OR and never overflows int32.
    out = torch.stack([shifted.narrow(dim, lo, hi - lo).sum(dim, dtype=torch.int32)
                       for lo, hi in segments], dim=dim)  # n_words along dim
    for j in straddlers:  # ... and land at the bottom of the next word
        word, bit = divmod(bits * j, _WORD_BITS)
        out.select(dim, word + 1).bitwise_or_(v.select(dim, j) >> (_WORD_BITS - bit))
    return out


def _unpack_blocks(words: torch.Tensor, bits: int, n_vals: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`_pack_blocks`: ``n_words`` int32 along ``dim`` -> ``n_vals`` codes."""
    shift, segments, straddlers = _layout(bits, n_vals, dim, words.dim(), words.device)
    shape = list(words.shape)
    shape[dim] = n_vals
    out = torch.empty(shape, dtype=torch.int32, device=words.device)
    for w, (lo, hi) in enumerate(segments):  # broadcast word w over the values starting in it
        torch.bitwise_right_shift(words.narrow(dim, w, 1), shift.narrow(dim, lo, hi - lo),
                                  out=out.narrow(dim, lo, hi - lo))
    for j in straddlers:  # low bits from this word (drop sign copies), high bits from the next
        word, bit = divmod(bits * j, _WORD_BITS)
        dst = out.select(dim, j).bitwise_and_((1 << (_WORD_BITS - bit)) - 1)
        dst.bitwise_or_(words.select(dim, word + 1) << (_WORD_BITS - bit))
    return out.bitwise_and_((1 << bits) - 1)  # >> is arithmetic: mask off copied sign bits


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``(rows, cols)`` along dim 0 into int32 ``(rows*bits//32, cols)`` (qweight)."""
    bits, n_vals, n_words = _check_values(values, bits, 0, "pack_rows")
    rows, cols = values.shape
    blocks = values.reshape(rows // n_vals, n_vals, cols)  # [n_blocks, n_vals, cols]
    packed = _pack_blocks(blocks, bits, n_words, dim=1)  # [n_blocks, n_words, cols]
    return packed.reshape(rows * bits // _WORD_BITS, cols)  # [rows*bits/32, cols]


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 ``(rows*bits//32, cols)`` words to int32 codes ``(rows, cols)``."""
    bits, n_vals, n_words = _check_packed(packed, bits, 0, "unpack_rows")
    prow, cols = packed.shape
    blocks = packed.reshape(prow // n_words, n_words, cols)  # [n_blocks, n_words, cols]
    vals = _unpack_blocks(blocks, bits, n_vals, dim=1)  # [n_blocks, n_vals, cols]
    return vals.reshape(prow // n_words * n_vals, cols)  # [rows, cols]


def pack_cols(values: torch.Tensor, bits: int, check_range: bool = True) -> torch.Tensor:
    """Pack codes ``(rows, cols)`` along dim 1 into int32 ``(rows, cols*bits//32)`` (qzeros).

    ``check_range=False`` skips the pass that checks every code fits: for callers that bounded them.
    """
    bits, n_vals, n_words = _check_values(values, bits, 1, "pack_cols", check_range)
    rows, cols = values.shape
    blocks = values.reshape(rows, cols // n_vals, n_vals)  # [rows, n_blocks, n_vals]
    packed = _pack_blocks(blocks, bits, n_words, dim=2)  # [rows, n_blocks, n_words]
    return packed.reshape(rows, cols * bits // _WORD_BITS)  # [rows, cols*bits/32]


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 ``(rows, cols*bits//32)`` words to int32 codes ``(rows, cols)``."""
    bits, n_vals, n_words = _check_packed(packed, bits, 1, "unpack_cols")
    rows, pcol = packed.shape
    blocks = packed.reshape(rows, pcol // n_words, n_words)  # [rows, n_blocks, n_words]
    vals = _unpack_blocks(blocks, bits, n_vals, dim=2)  # [rows, n_blocks, n_vals]
    return vals.reshape(rows, pcol // n_words * n_vals)  # [rows, cols]


def unpack_rows_u8(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`unpack_rows` as uint8 codes, a quarter of the memory; 2/4/8 bits take the bytes of the words
    apart directly (a little-endian word's byte ``k`` holds values ``k*8/bits ..``, lowest bits first)."""
    bits, n_vals, n_words = _check_packed(packed, bits, 0, "unpack_rows_u8")
    if n_words != 1 or sys.byteorder != "little":  # 3 bits straddle words
        return unpack_rows(packed, bits).to(torch.uint8)
    prow, cols = packed.shape
    data = packed.contiguous().view(torch.uint8).reshape(prow, cols, 4)  # byte k of word [r, c]
    if bits == 8:
        fields = data  # [prow, cols, 4]
    else:  # value j of a byte at bits [bits*j, bits*j + bits)
        fields = torch.stack([(data >> shift) & ((1 << bits) - 1) for shift in range(0, 8, bits)], dim=-1)
    # [prow, cols, n_vals] -> [prow, n_vals, cols] -> [rows, cols]
    return fields.reshape(prow, cols, n_vals).transpose(1, 2).reshape(prow * n_vals, cols)
