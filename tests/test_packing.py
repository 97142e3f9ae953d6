"""Tests for ``peft_qalora.gptq.packing``: GPTQ int32 bit packing (qweight rows, qzeros cols).

Three kinds of evidence:

* round trips (pack -> unpack) for 2/3/4/8 bits, rows and cols, incl. the extreme codes;
* words worked out by hand (comments show the arithmetic), incl. the signed-int32 words
  and the two 3-bit values (10 and 21) that straddle word boundaries;
* agreement with GPTQModel 7.7's OWN code as an independent implementation, on CPU, for
  all four widths:
    - ``TorchLinear.pack_block`` (the packer GPTQModel uses when it writes a checkpoint):
      its Python qweight path (vectorised 2/4/8, "10|1|10|1|10" 3-bit) and its numpy
      qzeros path; and its native C++ ``pack_block_cpu`` extension (2/4/8 only; GPTQModel
      itself has no native 3-bit path). The native test is skipped only when that JIT
      extension has not been built yet, since building it takes ~45 s;
    - ``utils/model_dequant.py``: ``unpack_rows``, ``unpack_cols`` (-> ``_unpack_rows_3bit``,
      ``_unpack_cols_3bit`` for 3-bit) and ``pack_cols`` (-> ``_pack_cols_3bit``);
    - ``TorchLinear.dequantize_weight`` (the torch kernel's unpack-and-dequantize path) run
      on OUR packed qweight/qzeros.
  GPTQModel has no standalone ``pack_rows``; ``pack_block`` covers qweight packing.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from peft_qalora.gptq.packing import pack_cols, pack_rows, unpack_cols, unpack_rows

BITS = (2, 3, 4, 8)


def _s32(word: int) -> int:
    """Unsigned 32-bit word -> the signed int32 value GPTQModel stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    """Random codes in [0, 2**bits) with both extremes forced into every block."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int32)
    v[0, :] = 0
    v[-1, :] = (1 << bits) - 1
    v[:, 0] = (1 << bits) - 1
    v[:, -1] = 0
    return v


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows", [32, 96])
def test_round_trip_rows(bits, rows):
    v = _codes(rows, 40, bits, seed=bits + rows)
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits), v)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [32, 96])
def test_round_trip_cols(bits, cols):
    v = _codes(24, cols, bits, seed=bits * cols)
    packed = pack_cols(v, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (24, cols * bits // 32)
    assert torch.equal(unpack_cols(packed, bits), v)


@pytest.mark.parametrize("bits,n", [(2, 16), (4, 8), (8, 4)])
def test_round_trip_smallest_block_for_power_of_two_bits(bits, n):
    # 2/4/8-bit only need a multiple of 32/bits, not of 32
    v = _codes(n, n, bits, seed=n)
    assert torch.equal(unpack_rows(pack_rows(v, bits), bits), v)
    assert torch.equal(unpack_cols(pack_cols(v, bits), bits), v)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_other_integer_dtypes_and_non_contiguous_input(dtype):
    v = _codes(64, 32, 3, seed=7)
    ref = pack_rows(v, 3)
    assert torch.equal(pack_rows(v.to(dtype), 3), ref)
    # a transposed (non-contiguous) view packs like its contiguous copy
    assert torch.equal(pack_cols(v.t().to(dtype), 3), pack_cols(v.t().contiguous(), 3))
    assert torch.equal(unpack_cols(pack_cols(v.t(), 3), 3), v.t())


def test_empty_packed_dimension():
    assert pack_rows(torch.zeros(0, 5, dtype=torch.int32), 4).shape == (0, 5)
    assert unpack_cols(torch.zeros(3, 0, dtype=torch.int32), 3).shape == (3, 0)


# ---------------------------------------------------------------- hand-worked words


def _both(values: list[int], bits: int) -> list[int]:
    """Pack one block as a column (pack_rows) and as a row (pack_cols); both must agree."""
    v = torch.tensor(values, dtype=torch.int32)
    by_rows = pack_rows(v[:, None], bits)[:, 0].tolist()
    by_cols = pack_cols(v[None, :], bits)[0].tolist()
    assert by_rows == by_cols
    return by_rows


def test_hand_worked_4bit():
    # value j at bits [4j, 4j+4): 1 | 2<<4 | 3<<8 | ... | 8<<28 = 0x87654321;
    # bit 31 is set, so the stored int32 is 0x87654321 - 2**32 = -2023406815
    assert _both([1, 2, 3, 4, 5, 6, 7, 8], 4) == [_s32(0x87654321)] == [-2023406815]
    assert _both([15] * 8, 4) == [-1]  # 0xFFFFFFFF
    assert _both([7, 0, 0, 0, 0, 0, 0, 7], 4) == [0x70000007]  # top nibble 7: bit 31 clear
    assert _both([1, 2, 3, 4, 5, 6, 7, 8, 15, 15, 15, 15, 15, 15, 15, 15], 4) == [-2023406815, -1]


def test_hand_worked_2bit():
    # [0,1,2,3] -> 0 | 1<<2 | 2<<4 | 3<<6 = 0b11_10_01_00 = 0xE4 per byte -> 0xE4E4E4E4
    assert _both([0, 1, 2, 3] * 4, 2) == [_s32(0xE4E4E4E4)] == [-454761244]
    # 1 | 2<<2 | 3<<4 = 0x39, and the last value 3<<30 = 0xC0000000 -> 0xC0000039
    assert _both([1, 2, 3] + [0] * 12 + [3], 2) == [_s32(0xC0000039)] == [-1073741767]
    assert _both([3] * 16, 2) == [-1]


def test_hand_worked_8bit():
    # bytes little-endian: 0x01 | 0x02<<8 | 0x03<<16 | 0x80<<24 = 0x80030201
    assert _both([0x01, 0x02, 0x03, 0x80], 8) == [_s32(0x80030201)] == [-2147286527]
    assert _both([255, 0, 0, 0], 8) == [255]
    assert _both([0, 0, 0, 127], 8) == [0x7F000000]
    assert _both([255] * 4, 8) == [-1]


def _three(assign: dict[int, int]) -> list[int]:
    values = [0] * 32
    for j, x in assign.items():
        values[j] = x
    return _both(values, 3)


def test_hand_worked_3bit_straddlers():
    # 96-bit little-endian stream over words w0, w1, w2: value j at bit 3j.
    # word0: values 0-9 at 3i, value 10's bits 0-1 at bits 30-31
    # word1: value 10's bit 2 at bit 0, values 11-20 at 1+3i, value 21's bit 0 at bit 31
    # word2: value 21's bits 1-2 at bits 0-1, values 22-31 at 2+3i
    assert _three({}) == [0, 0, 0]
    assert _three({0: 5}) == [5, 0, 0]
    assert _three({9: 7}) == [7 << 27, 0, 0]
    assert _three({10: 0b011}) == [_s32(0xC0000000), 0, 0]  # low 2 bits -> w0 bits 30,31
    assert _three({10: 0b100}) == [0, 1, 0]  # bit 2 -> w1 bit 0
    assert _three({10: 7}) == [-(1 << 30), 1, 0]
    assert _three({11: 1}) == [0, 1 << 1, 0]
    assert _three({20: 7}) == [0, 7 << 28, 0]
    assert _three({21: 0b001}) == [0, -(1 << 31), 0]  # bit 0 -> w1 bit 31 (sign bit)
    assert _three({21: 0b110}) == [0, 0, 3]  # bits 1,2 -> w2 bits 0,1
    assert _three({22: 1}) == [0, 0, 1 << 2]
    assert _three({31: 7}) == [0, 0, _s32(0xE0000000)]  # 7 << 29
    assert _three({j: 7 for j in range(32)}) == [-1, -1, -1]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [pack_rows, pack_cols, unpack_rows, unpack_cols])
@pytest.mark.parametrize("bits", [1, 5, 16, 4.0, True])
def test_unsupported_bits(fn, bits):
    with pytest.raises(ValueError, match=r"gptq\.packing: bits=.* is not supported; use one of 2, 3, 4 or 8"):
        fn(torch.zeros(32, 32, dtype=torch.int32), bits)


def test_packed_dimension_not_divisible():
    with pytest.raises(ValueError, match=r"gptq\.packing: pack_rows with 4-bit needs rows divisible by 8, got 12"):
        pack_rows(torch.zeros(12, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"pack_rows with 3-bit needs rows divisible by 32, got 48; pad"):
        pack_rows(torch.zeros(48, 8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"pack_cols with 2-bit needs cols divisible by 16, got 8"):
        pack_cols(torch.zeros(4, 8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"pack_cols with 8-bit needs cols divisible by 4, got 6"):
        pack_cols(torch.zeros(4, 6, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"unpack_rows with 3-bit needs packed rows divisible by 3"):
        unpack_rows(torch.zeros(4, 8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"unpack_cols with 3-bit needs packed cols divisible by 3"):
        unpack_cols(torch.zeros(4, 5, dtype=torch.int32), 3)


@pytest.mark.parametrize("bad", [-1, 16, 1000])
def test_values_out_of_range(bad):
    v = torch.zeros(8, 8, dtype=torch.int32)
    v[3, 5] = bad
    with pytest.raises(ValueError, match=r"gptq\.packing: 4-bit codes must lie in \[0, 15\].*clamp"):
        pack_rows(v, 4)
    with pytest.raises(ValueError, match=r"gptq\.packing: 4-bit codes must lie in \[0, 15\]"):
        pack_cols(v, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_values(dtype):
    with pytest.raises(ValueError, match=r"gptq\.packing: pack_rows needs integer codes, got dtype .*round"):
        pack_rows(torch.zeros(8, 8, dtype=dtype), 4)
    with pytest.raises(ValueError, match=r"gptq\.packing: pack_cols needs integer codes"):
        pack_cols(torch.zeros(8, 8, dtype=dtype), 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.uint8])
def test_unpack_needs_int32_words(dtype):
    with pytest.raises(ValueError, match=r"gptq\.packing: unpack_rows needs int32 words .*got dtype"):
        unpack_rows(torch.zeros(4, 8, dtype=dtype), 4)
    with pytest.raises(ValueError, match=r"gptq\.packing: unpack_cols needs int32 words"):
        unpack_cols(torch.zeros(4, 8, dtype=dtype), 4)


def test_not_a_matrix():
    with pytest.raises(ValueError, match=r"gptq\.packing: values must be 2-D \(rows, cols\), got shape \(32,\)"):
        pack_rows(torch.zeros(32, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"gptq\.packing: packed must be 2-D"):
        unpack_cols(torch.zeros(2, 2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"gptq\.packing: values must be a torch\.Tensor"):
        pack_rows([[1, 2]], 4)


# ---------------------------------------------------------------- GPTQModel as reference

IN, OUT, GROUP = 128, 96, 32  # GPTQModel's pack_block needs in and out divisible by 32


@pytest.fixture(scope="module")
def gm():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils import cpp, model_dequant

    return types.SimpleNamespace(TorchLinear=TorchLinear, md=model_dequant, cpp=cpp)


def _quant_problem(bits: int):
    """Codes q [in, out], true zeros z [groups, out], and a float Linear whose weight is
    exactly s * (q - z[g_idx]) with s = 1, so GPTQModel's round((W + s*z) / s) gives back q."""
    maxq = (1 << bits) - 1
    q = _codes(IN, OUT, bits, seed=100 + bits)  # [in, out]
    z = _codes(IN // GROUP, OUT, bits, seed=200 + bits)  # [groups, out]
    g_idx = torch.arange(IN, dtype=torch.int32) // GROUP
    lin = torch.nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        lin.weight.copy_((q - z[g_idx.long()]).T.float())  # nn.Linear is [out, in]
    scales = torch.ones(OUT, IN // GROUP)  # pack_block takes [out, groups] and transposes
    assert int(q.max()) == maxq and int(z.min()) == 0
    return q, z, g_idx, lin, scales


def _gptqmodel_pack(gm, bits: int):
    q, z, g_idx, lin, scales = _quant_problem(bits)
    module = gm.TorchLinear(bits=bits, group_size=GROUP, sym=False, desc_act=False,
                            in_features=IN, out_features=OUT, pack_dtype=torch.int32)
    module.pack_block(lin, scales, z.T.float(), g_idx)
    return q, z, module


@pytest.mark.parametrize("bits", BITS)
def test_matches_gptqmodel_pack_block_python_path(gm, bits, monkeypatch):
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")  # force the pure-Python packer
    q, z, module = _gptqmodel_pack(gm, bits)
    assert module.qweight.dtype == torch.int32 and module.qzeros.dtype == torch.int32
    assert torch.equal(module.qweight, pack_rows(q, bits))
    assert torch.equal(module.qzeros, pack_cols(z, bits))
    assert (module.qweight < 0).any()  # GPTQModel stores signed words too


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_gptqmodel_pack_block_native_extension(gm, bits, monkeypatch):
    root = gm.cpp.default_torch_ops_build_root("pack_block_cpu")
    if not any(root.glob("*/gptqmodel_pack_block_cpu.so")):
        pytest.skip(f"GPTQModel's pack_block_cpu JIT extension is not built under {root} (~45 s build)")
    monkeypatch.setenv("GPTQMODEL_FORCE_PACK_EXT", "1")  # fail instead of silently falling back
    monkeypatch.delenv("GPTQMODEL_DISABLE_PACK_EXT", raising=False)
    q, z, module = _gptqmodel_pack(gm, bits)
    assert torch.equal(module.qweight, pack_rows(q, bits))
    assert torch.equal(module.qzeros, pack_cols(z, bits))


@pytest.mark.parametrize("bits", BITS)
def test_matches_gptqmodel_model_dequant_helpers(gm, bits):
    v = _codes(IN, OUT, bits, seed=300 + bits)
    assert torch.equal(gm.md.unpack_rows(pack_rows(v, bits), bits), v)
    assert torch.equal(gm.md.unpack_cols(pack_cols(v, bits), bits), v)
    assert torch.equal(gm.md.pack_cols(v, bits, pack_dtype=torch.int32), pack_cols(v, bits))
    # and the other direction: our unpackers read GPTQModel's words
    assert torch.equal(unpack_cols(gm.md.pack_cols(v, bits, pack_dtype=torch.int32), bits), v)


@pytest.mark.parametrize("bits", BITS)
def test_gptqmodel_torch_kernel_dequantizes_our_tensors(gm, bits):
    q, z, g_idx, _, _ = _quant_problem(bits)
    module = gm.TorchLinear(bits=bits, group_size=GROUP, sym=False, desc_act=False,
                            in_features=IN, out_features=OUT, pack_dtype=torch.int32,
                            enable_wf_unsqueeze=True)
    module.qweight.copy_(pack_rows(q, bits))
    module.qzeros.copy_(pack_cols(z, bits))
    module.scales.fill_(1.0)
    weight = module.dequantize_weight()  # [in, out] = scales[g] * (q - z[g]) (v2: true zeros)
    assert torch.equal(weight.float(), (q - z[g_idx.long()]).float())
