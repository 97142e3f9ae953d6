"""A CPU training kernel for GPTQ linears: dequantize-and-matmul that keeps no float weight.

Why. GPTQModel's torch kernel unpacks the packed words on every call and multiplies with the
dequantized weight, which autograd then keeps alive until backward: during training every layer's
weight sits in memory as a dense float tensor, as much as the float model itself. Here the codes
are unpacked once into an int8 cache (1 byte a weight instead of 4), dequantization is one fused
broadcast per group, and backward recomputes the weight instead of saving it. The base weight is
frozen, so backward only needs `grad_x = grad_y @ W^T`.

Zeros and scales are read from the module at every call, so in-memory merges stay visible.
"""

from __future__ import annotations

import torch

from .gptq.tensors import QuantTensors


class CodesCache:
    """Unpacked int8 codes of one GPTQ layer, in group order, built on first use."""

    def __init__(self):
        self.codes: torch.Tensor | None = None  # (n_groups, group_size, out) int8
        self.order: torch.Tensor | None = None  # input permutation that makes groups contiguous, or None

    def get(self, tensors: QuantTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.codes is None:
            g_idx = tensors.g_idx.long()
            order = torch.argsort(g_idx, stable=True)
            contiguous = bool(torch.equal(order, torch.arange(g_idx.numel(), device=order.device)))
            codes = tensors.codes() if contiguous else tensors.codes()[order]  # (in, out)
            dtype = torch.int16 if tensors.bits == 8 else torch.int8  # 8-bit codes exceed int8
            self.codes = codes.to(dtype).view(tensors.n_groups, tensors.group_size, tensors.out_features)
            self.order = None if contiguous else order
        return self.codes, self.order


def dequantize_grouped(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """(G, gs, out) codes -> (G * gs, out) weight in group order: s * (q - z), one broadcast.

    The product is taken in the scales' dtype (fp16), as GPTQModel's kernels do, then cast, so a
    model trained here and the merged checkpoint read by GPTQModel see the same weights.
    """
    weight = (codes - zeros.to(codes.dtype)[:, None, :]).to(scales.dtype) * scales[:, None, :]
    return weight.reshape(-1, weight.shape[-1]).to(dtype)


class DequantMatmul(torch.autograd.Function):
    """y = x @ W for a frozen quantized W; backward recomputes W (never saved)."""

    @staticmethod
    def forward(ctx, x, codes, zeros, scales):
        weight = dequantize_grouped(codes, zeros, scales, x.dtype)  # (in, out)
        ctx.save_for_backward(codes, zeros, scales)
        return x @ weight

    @staticmethod
    def backward(ctx, grad_out):
        codes, zeros, scales = ctx.saved_tensors
        weight = dequantize_grouped(codes, zeros, scales, grad_out.dtype)
        return grad_out @ weight.T, None, None, None


def gptq_linear_forward(cache: CodesCache, tensors: QuantTensors, x: torch.Tensor, bias=None) -> torch.Tensor:
    """The base layer's output, computed from the cache: (..., in) -> (..., out)."""
    codes, order = cache.get(tensors)
    if order is not None:
        x = x.index_select(-1, order)
    out = DequantMatmul.apply(x, codes, tensors.zeros(), tensors.scales)
    return out if bias is None else out + bias.to(out.dtype)
