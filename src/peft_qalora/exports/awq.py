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

import torch

from ..gptq.packing import unpack_rows_u8
from ..gptq.tensors import QuantTensors
from .stream import LayerInfo, QuantFormat, check_zero_range

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within 8) stored in slot i of a word
# Group sizes vLLM's kernels take for AWQ: Marlin on GPU {-1, 32, 64, 128}; the CPU kernel any even size.
SERVED_GROUP_SIZES = (32, 64, 128)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit values -> int32 (rows, cols/8) in AWQ's interleaved order, built byte by byte in uint8:
    byte t of a (little-endian) word holds slot 2t in its low nibble and slot 2t + 1 in its high one."""
    rows, cols = values.shape
    if values.numel():
        lo, hi = (int(v) for v in torch.aminmax(values))
        if lo < 0 or hi > 15:
            raise ValueError(f"export awq: 4-bit values must lie in [0, 15], found min {lo} and max {hi}.")
    v = values.to(torch.uint8).reshape(rows, cols // 8, 8)  # column 8k + c at [:, k, c]
    words = v[:, :, _LOW] | (v[:, :, _HIGH] << 4)  # (rows, cols/8, 4) bytes
    return words.view(torch.int32).reshape(rows, cols // 8)


_LOW, _HIGH = list(AWQ_ORDER[0::2]), list(AWQ_ORDER[1::2])  # the columns in the low and high nibble of byte t
_ROWS_AT_ONCE = 1 << 23  # codes converted per step: bounds the temporaries whatever the layer's size


def awq_qweight(tensors: QuantTensors) -> torch.Tensor:
    """GPTQ codes (packed along the inputs) -> AWQ qweight int32 (in, out/8), a block of input rows at a time."""
    n_in, n_out = tensors.in_features, tensors.out_features
    qweight = tensors.qweight[: n_in // 8]  # 4-bit: 8 inputs a word
    out = torch.empty(n_in, n_out // 8, dtype=torch.int32)
    step = max(1, _ROWS_AT_ONCE // (8 * n_out))  # packed rows a step
    for r in range(0, qweight.shape[0], step):
        out[8 * r: 8 * (r + step)] = pack_awq(unpack_rows_u8(qweight[r: r + step], 4))  # (8 * step, out)
    return out


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
        zeros = tensors.zeros()  # (n_groups, out): true zeros
        check_zero_range(name, zeros, 4)
        return {"qweight": awq_qweight(tensors), "qzeros": pack_awq(zeros), "scales": tensors.scales.half()}

    def quant_config(self, source: dict, layers: list[LayerInfo], float_linears: list[str]) -> dict:
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": layers[0].group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": sorted(set(float_linears) | {"lm_head"}),
        }
