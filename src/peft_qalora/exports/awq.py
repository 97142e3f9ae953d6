"""AWQ (AutoAWQ GEMM layout): the route to current vLLM for asymmetric 4-bit weights.

Design note. AutoAWQ's `WQLinear_GEMM` (and vLLM's `auto_awq.py`, transformers + GPTQModel) hold:
- `qweight` int32 (in, out/8) and `qzeros` int32 (n_groups, out/8), both packed along the OUTPUT dim,
  8 nibbles a word; slot `i` of word `k` (bits 4i..4i+3) holds column `8k + AWQ_ORDER[i]`;
- `scales` fp16 (n_groups, out); dequantization `(q - z) * s` with TRUE zeros (no +1 as in GPTQ v1).
So a GPTQ layer maps code for code: transpose the packing axis of the codes, reorder within words,
store the true zeros. No `g_idx`: groups must be contiguous, which rules out act-order bases
(compressed-tensors stores those). Only 4 bits exist in vLLM's AWQ (`TYPE_MAP = {4: uint4}`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..gptq.packing import pack_cols
from ..gptq.tensors import QuantTensors, true_zero_words
from .stream import LayerInfo, QuantFormat

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within 8) stored in slot i of a word
# Group sizes vLLM's kernels take for AWQ: Marlin on GPU {-1, 32, 64, 128}; the CPU kernel any even size.
SERVED_GROUP_SIZES = (32, 64, 128)


def awq_qzeros(tensors: QuantTensors) -> torch.Tensor:
    """The layer's true zeros as AWQ's int32 (n_groups, out/8): GPTQ's zero words (`true_zero_words`, 8 outputs
    a word in order) with their nibbles reordered. Byte `b` of a GPTQ word holds outputs 2b (low) and 2b + 1
    (high); AWQ byte `t` holds outputs AWQ_ORDER[2t] (low) and AWQ_ORDER[2t + 1] (high): (0, 2), (4, 6), (1, 3),
    (5, 7), so its bytes are low nibbles of bytes (0, 1) and (2, 3), then high nibbles of the same pairs."""
    words = true_zero_words(tensors.qzeros, 4, tensors.zero_format, tensors.out_features)
    if words is None:  # outputs not a multiple of 8: `check` refused the layer; unpack as a last resort
        return pack_awq(tensors.zeros())
    b = words.contiguous().numpy().view(np.uint8).reshape(-1, 4)
    out = np.empty_like(b)
    np.bitwise_or(b[:, 0::2] & 0x0F, (b[:, 1::2] & 0x0F) << 4, out=out[:, :2])  # bytes 0, 1: low nibbles
    np.bitwise_or(b[:, 0::2] >> 4, b[:, 1::2] & 0xF0, out=out[:, 2:])  # bytes 2, 3: high nibbles
    return torch.from_numpy(out.reshape(-1).view(np.int32).reshape(words.shape))


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit values -> int32 (rows, cols/8) in AWQ's interleaved order (the zeros; codes go
    through `awq_qweight`)."""
    rows, cols = values.shape
    order = torch.tensor(AWQ_ORDER)
    interleaved = values.reshape(rows, cols // 8, 8)[:, :, order].reshape(rows, cols)  # slot i <- col order[i]
    return pack_cols(interleaved.to(torch.int32), 4)


def awq_qweight(tensors: QuantTensors) -> torch.Tensor:
    """GPTQ 4-bit qweight (in/8, out), 8 inputs a word -> AWQ qweight int32 (in, out/8), 8 outputs a word.

    Both are 8 x 8 nibble blocks (8 inputs x 8 outputs in 8 words), so no code is unpacked: bytes are moved.
    Byte `b` of GPTQ word [r, c] holds inputs 8r + 2b (low nibble) and 8r + 2b + 1 (high) of output c; byte
    `t` of AWQ word [i, k] holds outputs 8k + AWQ_ORDER[2t] (low) and 8k + AWQ_ORDER[2t + 1] (high), which for
    output 8k + 4a + 2s + e is t = 2e + a, low for s = 0 and high for s = 1. One transposing copy puts
    the s = 0 and s = 1 bytes side by side; the nibbles then combine in two vectorized steps per half.
    """
    n_in, n_out = tensors.in_features, tensors.out_features
    r, k = n_in // 8, n_out // 8
    words = tensors.qweight[:r].contiguous().numpy().reshape(r, k, 2, 2, 2)  # [r, k, a, s, e]
    # [s, r, b, k, e, a] in two copies, words then bytes: numpy copies a 6-d byte transpose with 2-byte inner runs
    # at a third of the speed
    by_word = np.ascontiguousarray(words.transpose(3, 0, 1, 4, 2)).view(np.uint8)  # [s, r, k, e, a] x 4 bytes
    by_s = np.ascontiguousarray(by_word.reshape(2, r, 4 * k, 4).transpose(0, 1, 3, 2)).reshape(2, r, 4, k, 2, 2)
    low, high = by_s[0], by_s[1]
    out = np.empty((r, 4, 2, k, 2, 2), dtype=np.uint8)  # [r, b, h, k, e, a]: input 8r + 2b + h, byte 2e + a of word k
    np.bitwise_or(low & 0x0F, high << 4, out=out[:, :, 0])  # inputs 8r + 2b: the low nibbles
    np.bitwise_or(low >> 4, high & 0xF0, out=out[:, :, 1])  # inputs 8r + 2b + 1: the high nibbles
    return torch.from_numpy(out.reshape(n_in, n_out // 2).view(np.int32))  # (in, out/8)


class AWQFormat(QuantFormat):
    name = "awq"

    def check(self, layer: LayerInfo) -> None:
        fix = "export with --format compressed-tensors instead, which stores it"
        if layer.bits != 4:
            raise ValueError(f"export awq: {layer.name} is {layer.bits}-bit but AWQ holds only 4-bit weights; {fix}.")
        if layer.act_order:
            raise ValueError(f"export awq: {layer.name} is act-order (scattered groups, g_idx) but AWQ has no g_idx; "
                             f"{fix} (note: vLLM 0.32 serves neither act-order layout).")
        if layer.out_features % 32 or layer.in_features % 32:
            raise ValueError(f"export awq: {layer.name} is {layer.in_features} x {layer.out_features}; AWQ packs 8 "
                             "outputs a word and vLLM's kernels need both dims multiples of 32; no format vLLM serves "
                             "holds this layer quantized.")
        if layer.group_size not in SERVED_GROUP_SIZES:
            raise ValueError(f"export awq: {layer.name} has group size {layer.group_size}; vLLM's AWQ kernels take "
                             f"{SERVED_GROUP_SIZES}. Quantize the base with one of those (peft-qalora quantize "
                             "--group-size 32).")

    def specs(self, layer: LayerInfo) -> dict[str, tuple[str, tuple[int, ...]]]:
        n_in, n_out, n_groups = layer.in_features, layer.out_features, layer.n_groups
        return {"qweight": ("I32", (n_in, n_out // 8)), "qzeros": ("I32", (n_groups, n_out // 8)),
                "scales": ("F16", (n_groups, n_out))}

    def convert(self, name: str, tensors: QuantTensors) -> dict[str, torch.Tensor]:
        # true zeros GPTQModel reads are in range by construction at 4 bits: a word add wraps, never overflows a field
        return {"qweight": awq_qweight(tensors), "qzeros": awq_qzeros(tensors), "scales": tensors.scales.half()}

    def quant_config(self, source: dict, layers: list[LayerInfo], float_linears: list[str]) -> dict:
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": layers[0].group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": sorted(set(float_linears) | {"lm_head"}),
        }
