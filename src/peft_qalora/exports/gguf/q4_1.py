"""GGUF `Q4_1` for llama.cpp: a 4-bit GPTQ model block for block, and the paper's float-zero merge.

Design note. ggml's `block_q4_1` (`ggml-common.h`) covers 32 consecutive inputs of one output row:
fp16 `d`, fp16 `m`, then 16 bytes where byte `j` holds element `j` in its low nibble and element
`j + 16` in its high nibble (`dequantize_row_q4_1`: `x = d * q + m`, `q` in [0, 15]). A tensor is
one row per output channel, each row its `in / 32` blocks in input order. A 4-bit asymmetric GPTQ
group is `x = s * (q - z)`, so with contiguous groups whose size is a multiple of 32:

    d = s,   m = -s * z,   the same codes          (only `m` is rounded, to fp16)

`m` is a free fp16 number, not an integer zero, so an adapter's per-group update `delta` (from
`merge.zeros.group_delta`) folds in without rounding the shift: `m' = -s * (z - delta / s) = -s * z +
delta`. Trained scales give `d' = fp16(s * (1 + c))` (`merge.zeros.trained_scales`) and, for `exact`
adapters, the integer zeros they trained with (`merge.zeros.merge_zeros`, as the GPTQ merge writes them),
so an exact adapter merged here is its trained model as the GPTQ merge is, up to `m`'s fp16 rounding.

Everything else (token embeddings, norms, output head, metadata, tokenizer, the q/k row permutation
of LLaMA's rotary layout) is llama.cpp's own `convert_hf_to_gguf.py`, run on the folder with these
blocks substituted for the quantized linears (`llamacpp.py`; the drivers are `__init__.py`). Rows are output channels, so a
row permutation moves whole rows of blocks and keeps every block intact.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...merge.adapters import LayerAdapter
from ...gptq import checkpoint as ckpt
from ...gptq.tensors import QuantTensors
from ...gptq.validate import check_checkpoint
from ...merge.zeros import code_moments, merge_zeros, merged_scales

logger = logging.getLogger(__name__)
from ..stream import LayerInfo, layer_info, quantized_layers

QK4_1 = 32  # inputs per block
BLOCK_BYTES = 2 + 2 + QK4_1 // 2  # fp16 d, fp16 m, 16 bytes of nibbles
FP16_MAX = 65504.0
CHUNK_BYTES = 4 << 20  # codes converted at a time: the conversion's copies stay this small
# Checked end to end in llama.cpp against transformers (tests/test_gguf_architectures.py). Any other architecture
# llama.cpp's converter knows is converted by the converter's own class too, and refused before a tensor is written
# if that class does more to a quantized linear than move whole rows (`gguf_llamacpp.row_order`).
CHECKED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                         "Gemma2ForCausalLM", "Phi3ForCausalLM")


def q4_1_blocks(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """ggml `block_q4_1` rows of one linear.

    Args:
        codes: (in, out) integer codes in [0, 15], GPTQ orientation.
        d, m: (n_groups, out) fp16 scale and minimum of every contiguous group (group size a multiple of 32).
    Returns (out, in / 32 * 20) uint8: row `o` is output channel `o`, its blocks in input order.
    """
    n_in, out = codes.shape
    q = codes.T.to(torch.uint8).reshape(out, n_in // QK4_1, 2, QK4_1 // 2)  # [..., 0, j] element j, [..., 1, j] j + 16
    qs = np.ascontiguousarray((q[:, :, 0] | (q[:, :, 1] << 4)).numpy())  # (out, n_blocks, 16)
    blocks = np.empty((out, n_in // QK4_1 * BLOCK_BYTES), dtype=np.uint8)
    _blocks(d, m, qs.view(np.uint32), blocks)
    return blocks


def q4_1_blocks_packed(qweight: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """`q4_1_blocks` straight from a 4-bit GPTQ qweight (in/8, out), no code unpacked: words are moved.

    Block n of output o takes words 4n .. 4n + 3 of column o: a "low" pair (words 4n, 4n + 1: elements 0-15,
    nibble k of the pair is element k) and a "high" pair (elements 16-31). Q4_1's 16 bytes, read as 32 nibbles,
    interleave them: nibble 2k is low's nibble k and nibble 2k + 1 is high's (byte j = element j | element
    j + 16 << 4). So each pair, as one 64-bit number, has its nibbles spread to every other nibble of 128 bits;
    done a byte at a time: low's bytes get high's low nibbles above theirs (even bytes of the result) and
    high's high nibbles below theirs (odd bytes). Every step runs on contiguous 64- or 16-bit arrays (numpy is
    several times slower on strided byte views), after one transposing copy of 32-bit words. Outputs go a few MB
    of codes at a time, so the steps' copies stay that small (a 70B MLP holds 117 MB of codes) and in cache.
    """
    n_in, out = qweight.shape[0] * 8, qweight.shape[1]
    blocks = np.empty((out, n_in // QK4_1 * BLOCK_BYTES), dtype=np.uint8)
    step = max(1, CHUNK_BYTES // (4 * qweight.shape[0]))  # outputs a chunk
    for first in range(0, out, step):
        last = min(first + step, out)
        _packed_rows(qweight[:, first:last], d[:, first:last], m[:, first:last], blocks[first:last])
    return blocks


def _packed_rows(qweight: torch.Tensor, d: torch.Tensor, m: torch.Tensor, blocks: np.ndarray) -> None:
    """`q4_1_blocks_packed` of some outputs, written into their rows `blocks`."""
    n_in, out = qweight.shape[0] * 8, qweight.shape[1]
    n_blocks = n_in // QK4_1
    pairs = np.ascontiguousarray(qweight.numpy().T).view(np.uint64).reshape(out, n_blocks, 2)  # [o, n, low/high]
    low, high = np.ascontiguousarray(pairs[:, :, 0]), np.ascontiguousarray(pairs[:, :, 1])
    del pairs
    nibbles = np.uint64(0x0F0F0F0F0F0F0F0F)
    even = low & nibbles  # byte 2b of the result: low nibble of low's byte b, then of high's byte b
    even |= (high & nibbles) << np.uint64(4)
    odd = (low >> np.uint64(4)) & nibbles  # byte 2b + 1: the high nibbles of the same two bytes
    odd |= high & ~nibbles
    del low, high
    qs = even.view(np.uint8).astype(np.uint16)
    qs |= odd.view(np.uint8).astype(np.uint16) << np.uint16(8)
    _blocks(d, m, qs.view(np.uint32).reshape(out, n_blocks, 4), blocks)


def _blocks(d: torch.Tensor, m: torch.Tensor, qs: np.ndarray, rows: np.ndarray) -> None:
    """Fill `rows`, (out, n_blocks * 20) uint8 (C-contiguous), with blocks from their (out, n_blocks, 4) uint32
    quant bytes and the groups' fp16 d and m (little-endian): a block is five 32-bit words, d | m << 16 then the
    16 bytes."""
    out, n_blocks = qs.shape[0], qs.shape[1]
    n_groups = d.shape[0]
    halves = [t.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) for t in (d, m)]
    dm = (halves[0] | halves[1] << np.uint32(16)).T  # (out, n_groups)
    words = rows.view(np.uint32).reshape(out, n_blocks, 5)  # a view: rows are whole and contiguous
    words.reshape(out, n_groups, n_blocks // n_groups, 5)[..., 0] = dm[:, :, None]  # a group spans whole blocks
    words[:, :, 1:] = qs.reshape(out, n_blocks, 4)


@dataclass
class LayerTerms:
    """One linear as Q4_1 terms, and what writing it cost."""

    d: torch.Tensor  # (n_groups, out) fp16
    m: torch.Tensor  # (n_groups, out) fp16, as stored
    max_m_error: float  # largest |fp16(m) - m| over all groups, in quantization steps (units of d)
    mean_abs_shift: float = 0.0  # adapter shift |delta / s| averaged over groups, in steps
    integer_zeros: dict | None = None  # `merge_zeros` statistics when the shifts were rounded (exact adapters)


def q4_1_terms(tensors: QuantTensors, adapter: LayerAdapter | None = None, name: str = "",
               integer_shifts: bool = False) -> LayerTerms:
    """`d` and `m` of one GPTQ linear, with an adapter folded in when given.

    Without an adapter `m = -s * z`. With one, `delta` is its per-group update: float shifts give
    `m = -d * (z - delta / s)` (`= -s * z + delta` without trained scales); `integer_shifts` (exact
    adapters) gives `m = -d * z'` with `z'` the integer zeros `merge_zeros(..., "exact")` writes to GPTQ.
    """
    scales, zeros = tensors.scales, tensors.zeros()  # (G, out) fp16, (G, out) int true zeros
    s, z = scales.float(), zeros.float()
    d = scales.half()
    integer_stats, mean_shift = None, 0.0
    if adapter is None:
        m = -s * z  # exact in float32: an 11-bit mantissa times a 4-bit integer
    else:
        delta = adapter.delta(tensors.in_features, tensors.n_groups, tensors.g_idx, name)  # (G, out)
        moments = code_moments(tensors.codes(), tensors.g_idx, tensors.n_groups) if adapter.magnitude is not None else None
        mean_shift = float((delta / s).abs().mean()) if delta.numel() else 0.0
        if integer_shifts:
            new_zeros, stats = merge_zeros(zeros, scales, delta, tensors.bits, "exact", zero_format=1)
            trained = merged_scales(scales, zeros, new_zeros, adapter.scale_delta, adapter.magnitude, moments, name=name)
            d = d if trained is None else trained
            m, integer_stats = -d.float() * new_zeros.float(), stats.to_dict()
        else:  # DoRA's norm then of the float-shifted weight, as it trained
            trained = merged_scales(scales, zeros, zeros, adapter.scale_delta, adapter.magnitude, moments, delta=delta,
                                    name=name)
            if trained is None:
                m = delta - s * z
            else:
                d, m = trained, -trained.float() * (z - delta / s)
    return LayerTerms(d, *_round_m(m, d, name), mean_abs_shift=mean_shift, integer_zeros=integer_stats)


def _round_m(m: torch.Tensor, d: torch.Tensor, name: str) -> tuple[torch.Tensor, float]:
    """fp16 `m` and its largest rounding error in steps of `d` (0 where d is 0); raises where fp16 cannot hold it."""
    if not m.numel():
        return m.half(), 0.0
    largest = float(m.abs().max())  # NaN if any m is NaN
    if not math.isfinite(largest) or largest > FP16_MAX:
        raise ValueError(f"export gguf: {name} has a block minimum of {largest:.4g}, beyond fp16 "
                         f"(|m| <= {FP16_MAX}); Q4_1 cannot store this layer. Is the adapter or the base broken?")
    m16 = m.half()
    steps = (m16.float() - m).abs_().div_(d.float().abs())  # d = 0: 0 / 0 or x / 0, neither a step
    return m16, float(steps.nan_to_num_(nan=0.0, posinf=0.0).max())


# --- planning: every refusal before anything is written -------------------------------------------------


@dataclass
class GGUFPlan:
    src: Path
    quant_config: dict
    architecture: str
    layers: list[LayerInfo]
    shards: list[Path]  # the checked shards: the only safetensors llama.cpp's converter is shown


def plan_gguf(src, widen: bool = False) -> GGUFPlan:
    """Check a GPTQ folder can become Q4_1 exactly; raises, naming the problem and the way out."""
    src = Path(src)
    checkpoint = check_checkpoint(src)  # every check on the folder (gptq/validate.py), before any work
    quant = checkpoint.quant_config
    config = ckpt.read_config(src)
    architecture = (config.get("architectures") or [None])[0]
    if not isinstance(architecture, str):
        raise ValueError(
            f"export gguf: {src}/config.json names no architecture (`architectures`), which llama.cpp's converter "
            "needs to pick its model class; add it (e.g. [\"LlamaForCausalLM\"]) or export as awq or compressed-tensors.")
    reader = ckpt.ShardReader(src, checkpoint)
    layers = [layer_info(reader, name, int(quant["bits"])) for name in quantized_layers(reader)]
    if not layers:
        raise ValueError(f"export gguf: {src} holds no quantized linear (no *.qweight); pass a GPTQ checkpoint.")
    for layer in layers:
        check_layer(layer, widen)
    if architecture not in CHECKED_ARCHITECTURES:
        logger.warning("export gguf: %s goes through llama.cpp's own converter class for it, but was not checked end "
                       "to end against transformers here (checked: %s)", architecture, ", ".join(CHECKED_ARCHITECTURES))
    return GGUFPlan(src, quant, architecture, layers, checkpoint.shards)


def check_layer(layer: LayerInfo, widen: bool = False) -> None:
    if layer.bits != 4 and not (widen and layer.bits in (2, 3)):
        raise ValueError(_bits_refusal(layer))
    if layer.act_order:
        raise ValueError(
            f"export gguf: {layer.name} is act-order (groups scattered over the inputs, desc_act) but a GGUF block "
            "is 32 consecutive inputs; quantize the base without act-order (peft-qalora quantize, desc_act off), "
            "or export as compressed-tensors, which keeps g_idx.")
    if layer.group_size % QK4_1 or layer.in_features % QK4_1:
        raise ValueError(
            f"export gguf: {layer.name} has group size {layer.group_size} ({layer.in_features} inputs) but a Q4_1 "
            f"block holds {QK4_1} inputs with one scale and minimum, so groups must be multiples of {QK4_1}; "
            "quantize the base with --group-size 32, 64 or 128.")


def _bits_refusal(layer: LayerInfo) -> str:
    head = (f"export gguf: {layer.name} is {layer.bits}-bit, but Q4_1 (x = d * q + m, fp16 d and m per 32 inputs) "
            "is the only GGUF type that stores an asymmetric GPTQ group exactly, and its codes are 4-bit")
    if layer.bits == 8:
        return (head + "; Q8_0 is symmetric (x = d * q, q in [-128, 127], no minimum) and cannot hold q - z in "
                "[-255, 255], and Q8_1 / Q8_K are llama.cpp's activation formats (Q8_1's second number is a sum, "
                "not a minimum), so no GGUF file holds this model exactly. Quantize the base at 4 bits to run it "
                "losslessly in llama.cpp.")
    return (head + f"; the K-quants (Q2_K, Q3_K) re-quantize their scales to 4-6 bits under one fp16 per 256 "
            f"inputs (and Q3_K has no minimum), so no GGUF type holds a {layer.bits}-bit group exactly at its own "
            "size. Q4_1 holds these codes exactly at 5 bits per weight, no smaller than a 4-bit model: pass "
            "widen=True (--gguf-widen) to write that.")
