"""Property-based tests (hypothesis) of the format code: packing, zero conventions, merge_zeros.

Each property is checked against an independent reference written here in plain Python integers
(bit positions from gptq-format.md, GPTQModel's packed-word +1 per field), not against the code
under test run twice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from peft_qalora.gptq.packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from peft_qalora.gptq.tensors import (
    QuantTensors,
    encode_zeros,
    portable_zero_range,
    zeros_as_gptqmodel_reads,
    zeros_as_per_field_readers,
)
from peft_qalora.merge.zeros import merge_zeros

FAST = settings(max_examples=75, deadline=None)
BITS = st.sampled_from((2, 3, 4, 8))
INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # GPTQModel's v1 -> v2 add, one 1 per field


def per_block(bits: int) -> int:
    """Values in the smallest run of whole int32 words."""
    return 32 // math.gcd(32, bits)


@st.composite
def codes(draw, axis: int, bits=None):
    """(bits, codes) with the packed axis a multiple of the block size; every value in [0, 2^bits)."""
    bits = draw(BITS) if bits is None else bits
    packed_len = per_block(bits) * draw(st.integers(1, 3))
    other = draw(st.integers(1, 5))
    shape = (packed_len, other) if axis == 0 else (other, packed_len)
    values = draw(arrays(np.int32, shape, elements=st.integers(0, (1 << bits) - 1)))
    return bits, torch.from_numpy(values)


def reference_fields(words: np.ndarray, bits: int) -> np.ndarray:
    """Fields of packed words along the last axis: value j of a block at bit offset bits*j of the
    block's words read as one little-endian stream (gptq-format.md, incl. 3-bit straddlers)."""
    n_words = bits // math.gcd(32, bits)
    rows, cols = words.shape
    out = np.zeros((rows, cols // n_words * per_block(bits)), dtype=np.int64)
    for r in range(rows):
        for b in range(cols // n_words):
            stream = sum((int(words[r, b * n_words + k]) & 0xFFFFFFFF) << (32 * k) for k in range(n_words))
            for j in range(per_block(bits)):
                out[r, b * per_block(bits) + j] = (stream >> (bits * j)) & ((1 << bits) - 1)
    return out


# ------------------------------------------------------------------------------------------ packing


@FAST
@given(codes(axis=0))
def test_rows_round_trip(case):
    bits, values = case
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (values.shape[0] * bits // 32, values.shape[1])
    assert torch.equal(unpack_rows(packed, bits), values)


@FAST
@given(codes(axis=1))
def test_cols_round_trip_and_bit_positions(case):
    bits, values = case
    packed = pack_cols(values, bits)
    assert torch.equal(unpack_cols(packed, bits), values)
    assert np.array_equal(reference_fields(packed.numpy(), bits), values.numpy())


@FAST
@given(BITS, st.integers(1, 3), st.integers(1, 4), st.data())
def test_every_word_pattern_unpacks_and_packs_back(bits, blocks, other, data):
    """Fields tile the words exactly (32 values in 3 words at 3 bits), so unpack is a bijection."""
    n_words = bits // math.gcd(32, bits) * blocks
    words = torch.from_numpy(data.draw(arrays(np.int32, (other, n_words), elements=INT32)))
    assert torch.equal(pack_cols(unpack_cols(words, bits), bits), words)
    assert torch.equal(pack_rows(unpack_rows(words.T.contiguous(), bits), bits), words.T)


@FAST
@given(BITS, st.integers(1, 4), st.one_of(st.integers(-50, -1), st.integers(0, 50)))
def test_codes_outside_the_width_are_refused(bits, cols, offset):
    bad = offset if offset < 0 else (1 << bits) + offset
    values = torch.zeros(cols, per_block(bits), dtype=torch.int32)
    values[-1, -1] = bad
    with pytest.raises(ValueError, match=f"{bits}-bit codes must lie in"):
        pack_cols(values, bits)


# ------------------------------------------------------------------------------ zero conventions


@st.composite
def true_zeros(draw, zero_format: int):
    bits = draw(BITS)
    low, high = portable_zero_range(bits, zero_format)
    groups, cols = draw(st.integers(1, 4)), per_block(bits) * draw(st.integers(1, 2))
    zeros = draw(arrays(np.int32, (groups, cols), elements=st.integers(low, high)))
    return bits, torch.from_numpy(zeros)


@FAST
@given(st.sampled_from((1, 2)).flatmap(lambda f: st.tuples(st.just(f), true_zeros(f))))
def test_portable_zeros_read_the_same_by_every_loader(case):
    zero_format, (bits, zeros) = case
    packed = encode_zeros(zeros, bits, zero_format)
    fields = zeros - 1 if zero_format == 1 else zeros  # v1 stores z - 1, v2 stores z
    assert torch.equal(unpack_cols(packed, bits), fields)
    assert torch.equal(zeros_as_per_field_readers(packed, bits, zero_format), zeros)
    assert torch.equal(zeros_as_gptqmodel_reads(packed, bits, zero_format), zeros)


@FAST
@given(BITS, st.sampled_from((1, 2)), st.booleans())
def test_zeros_outside_the_portable_range_are_refused(bits, zero_format, below):
    low, high = portable_zero_range(bits, zero_format)
    zeros = torch.full((1, per_block(bits)), low, dtype=torch.int32)
    zeros[0, 0] = low - 1 if below else high + 1
    if below and zero_format == 2:
        zeros[0, 0] = -1
    with pytest.raises(ValueError, match="clamp them first"):
        encode_zeros(zeros, bits, zero_format)


@FAST
@given(BITS, st.integers(1, 3), st.integers(1, 2), st.data())
def test_v1_words_read_as_gptqmodel_and_per_field_loaders_do(bits, groups, blocks, data):
    """Any v1 qzeros words: GPTQModel adds one per field on whole words (2/4/8 bits; carries cross
    fields) or per field modulo 8 (3 bits); vLLM and ExLlamaV2 add one to each field on its own."""
    n_words = bits // math.gcd(32, bits) * blocks
    words = data.draw(arrays(np.int32, (groups, n_words), elements=INT32))
    fields = reference_fields(words, bits)
    if bits == 3:
        gptqmodel = (fields + 1) % 8
    else:
        added = ((words.astype(np.int64) & 0xFFFFFFFF) + WORD_OFFSET[bits]) & 0xFFFFFFFF
        gptqmodel = reference_fields(added, bits)
    packed = torch.from_numpy(words)
    assert np.array_equal(zeros_as_gptqmodel_reads(packed, bits, 1).numpy(), gptqmodel)
    assert np.array_equal(zeros_as_per_field_readers(packed, bits, 1).numpy(), fields + 1)
    assert np.array_equal(zeros_as_per_field_readers(packed, bits, 2).numpy(), fields)


# ------------------------------------------------------------------------------------- merge_zeros


@st.composite
def merge_case(draw):
    bits, zero_format = draw(BITS), draw(st.sampled_from((1, 2)))
    groups, cols = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    maxq = (1 << bits) - 1
    zeros = draw(arrays(np.int32, (groups, cols), elements=st.integers(0, maxq)))  # base may hold unportable 0
    magnitude = st.floats(2.0**-10, 10.0, width=32) | st.sampled_from((0.25, 1.0, 2.0))  # powers of 2: exact ties
    scales = draw(arrays(np.float32, (groups, cols), elements=st.one_of(magnitude, magnitude.map(lambda x: -x))))
    halves = st.integers(-4 * maxq, 4 * maxq).map(lambda k: k / 2)  # ties of the rounding, often
    steps = draw(arrays(np.float32, (groups, cols), elements=st.floats(-2.0 * maxq, 2.0 * maxq, width=32) | halves))
    strategy = draw(st.sampled_from(("nearest", "exact")))
    return bits, zero_format, strategy, torch.from_numpy(zeros), torch.from_numpy(scales), torch.from_numpy(steps)


@settings(max_examples=200, deadline=None)  # the example: a clamp the count missed, found by hypothesis
@given(merge_case())
@example((4, 1, "nearest", torch.tensor([[2]], dtype=torch.int32), torch.tensor([[1.0]]), torch.tensor([[1.5]])))
def test_merge_zeros_invariants(case):
    """Inputs untouched (codes are not even an argument: a merge only moves zeros), output inside the portable
    range, every clamp counted: the count equals a direct count of rounded shifts that leave the range."""
    bits, zero_format, strategy, zeros, scales, steps = case
    delta = steps * scales  # (groups, out) update, `steps` quantization steps of each group
    before = [t.clone() for t in (zeros, scales, delta)]
    merged, stats = merge_zeros(zeros, scales, delta, bits, strategy, zero_format=zero_format)
    assert all(torch.equal(a, b) for a, b in zip(before, (zeros, scales, delta)))
    # exact adapters trained inside the v1 range (LayerCache.shift_min/max): every output clamps to it
    low, high = portable_zero_range(bits, 1 if strategy == "exact" else zero_format)
    assert merged.dtype == torch.int32 and merged.shape == zeros.shape
    assert int(merged.min()) >= low and int(merged.max()) <= high
    rounded = torch.round(delta.float() / scales.float())  # what "nearest" and "exact" move the zeros by
    wanted = zeros.float() - rounded
    assert stats.clamped == int(((wanted < low) | (wanted > high)).sum())
    assert torch.equal(merged.float(), wanted.clamp(low, high))
    assert stats.unportable_base_zeros == int(((zeros < low) | (zeros > high)).sum())
    assert stats.moved == int((merged != zeros).sum()) and stats.zeros == zeros.numel()


@FAST
@given(BITS, st.integers(1, 3), st.data())
def test_new_zeros_leave_codes_scales_and_g_idx_untouched(bits, groups, data):
    out = per_block(bits)
    in_features = groups * per_block(bits)
    codes_ = torch.from_numpy(data.draw(arrays(np.int32, (in_features, out), elements=st.integers(0, (1 << bits) - 1))))
    low, high = portable_zero_range(bits, 1)
    zeros = torch.from_numpy(data.draw(arrays(np.int32, (groups, out), elements=st.integers(low, high))))
    tensors = QuantTensors(pack_rows(codes_, bits), encode_zeros(zeros, bits), torch.ones(groups, out).half(),
                           torch.arange(in_features, dtype=torch.int32) // per_block(bits), bits)
    new_zeros = torch.from_numpy(data.draw(arrays(np.int32, (groups, out), elements=st.integers(0, high))))
    moved = tensors.with_zeros(new_zeros, zero_format=2)
    assert moved.qweight is tensors.qweight and moved.scales is tensors.scales and moved.g_idx is tensors.g_idx
    assert torch.equal(moved.codes(), codes_) and torch.equal(moved.zeros(), new_zeros)
