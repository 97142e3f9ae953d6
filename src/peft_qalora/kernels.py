"""A CPU training kernel for GPTQ linears: one dequantize-and-matmul for the base AND its adapter.

Why. Every weight QA-LoRA trains is affine per quantization group: the base is `s * (q - z)`, the
pooled adapter adds a constant `delta` to every weight of a group, exact mode adds `s * k`, trained
scales replace `s`. So the adapted layer is `y = x @ W` with

    W[i, o] = levels[i, o] * S[g(i), o] + D[g(i), o],      levels = q - z  (small integers)

and the adapter costs no pass over the activations of its own: forward is one fused `addcmul` into
a reused buffer and one matmul; backward recomputes W (never saved: no float weight lives through a
step), gives `grad_x = grad_y @ W^T` for base and adapter at once, `grad_D = P(x)^T @ grad_y` from
the group-pooled input, and only for trained scales the weight gradient a dense update needs.

Buffers are reused because a fresh multi-megabyte CPU tensor is a fresh mmap: its page faults cost
ten times the arithmetic that fills it.
"""

from __future__ import annotations

import threading

import torch

from .gptq.tensors import QuantTensors


class LevelsCache:
    """`q - z` of one GPTQ layer as int8 (int16 at 8 bits), (G, gs, out) in group order.

    Built on first use and rebuilt when the layer's qzeros change (an in-memory merge or unmerge).
    """

    def __init__(self):
        self.levels: torch.Tensor | None = None
        self.order: torch.Tensor | None = None  # input permutation that makes groups contiguous, or None
        self.key: tuple | None = None

    def get(self, tensors: QuantTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (tensors.qzeros.data_ptr(), tensors.qzeros._version, tensors.qweight.data_ptr())
        if self.levels is None or key != self.key:
            g_idx = tensors.g_idx.long()
            order = torch.argsort(g_idx, stable=True)
            contiguous = bool(torch.equal(order, torch.arange(g_idx.numel(), device=order.device)))
            codes = tensors.codes() if contiguous else tensors.codes()[order]  # (in, out), group order
            shape = (tensors.n_groups, tensors.group_size, tensors.out_features)
            levels = codes.view(shape) - tensors.zeros()[:, None, :]
            self.levels = levels.to(torch.int16 if tensors.bits == 8 else torch.int8)  # |q - z| < 2^bits
            self.order = None if contiguous else order
            self.key = key
        return self.levels, self.order


_buffers = threading.local()


def _buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device, slot: str) -> torch.Tensor:
    """A scratch tensor reused across layers and steps (its contents never outlive the call)."""
    pool = _buffers.__dict__.setdefault("pool", {})
    key = (slot, dtype, device)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < shape.numel():
        buffer = pool[key] = torch.empty(shape.numel(), dtype=dtype, device=device)
    return buffer[: shape.numel()].view(shape)


def group_affine_weight(levels, S, D, dtype, fp16_weight: bool) -> torch.Tensor:
    """(G, gs, out) levels -> the (G * gs, out) weight `levels * S + D`, in a reused buffer.

    `fp16_weight` rounds each weight to fp16, the value GPTQModel computes from a checkpoint
    holding these zeros and scales (`s * (q - z)` is exact in fp32, so rounding it once is the same).
    """
    weight = _buffer(levels.shape, dtype, levels.device, "weight").copy_(levels)
    if D is None:
        weight.mul_(S[:, None, :])
    else:
        torch.addcmul(D[:, None, :].to(dtype), weight, S[:, None, :].to(dtype), out=weight)
    if fp16_weight:
        weight.copy_(_buffer(levels.shape, torch.float16, levels.device, "fp16").copy_(weight))
    return weight.view(-1, levels.shape[-1])


class GroupAffineMatmul(torch.autograd.Function):
    """y = x @ W, W = levels * S + D per group (see the module note); x is in group order.

    Gradients reach S and D if they require them (straight-through the fp16 rounding); levels are
    constant. Saved for backward: levels, S, D, the pooled x (for D) and x itself only for S.
    """

    @staticmethod
    def forward(ctx, x, levels, S, D, fp16_weight):
        weight = group_affine_weight(levels, S, D, x.dtype, fp16_weight)
        n_groups = levels.shape[0]
        pooled = x.unflatten(-1, (n_groups, -1)).sum(-1) if D is not None and D.requires_grad else None
        ctx.fp16_weight, ctx.dtype = fp16_weight, x.dtype
        ctx.save_for_backward(x if S.requires_grad else None, pooled, levels, S, D)
        return x @ weight

    @staticmethod
    def backward(ctx, grad_y):
        x, pooled, levels, S, D = ctx.saved_tensors
        grad_x = grad_S = grad_D = None
        grad_y = grad_y.to(ctx.dtype)  # under autocast the forward's matmul ran (and returned) in bf16
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[0]:
            weight = group_affine_weight(levels, S, D, ctx.dtype, ctx.fp16_weight)
            grad_x = grad_y @ weight.T
        if ctx.needs_input_grad[3]:
            grad_D = (pooled.reshape(-1, pooled.shape[-1]).T @ flat_grad).to(D.dtype)  # (G, out)
        if ctx.needs_input_grad[2]:
            grad_weight = x.reshape(-1, x.shape[-1]).T @ flat_grad  # (in, out): what trained scales cost
            grad_S = (grad_weight.view(levels.shape) * levels).sum(1).to(S.dtype)
        return grad_x, None, grad_S, grad_D, None


def gptq_linear_forward(cache: LevelsCache, tensors: QuantTensors, x: torch.Tensor, bias=None, scales=None,
                        delta=None, fp16_weight: bool = True) -> torch.Tensor:
    """(..., in) -> (..., out): the layer with weight `(q - z) * scales + delta` per group.

    `scales` default to the layer's own, `delta` (G, out) to none: then this is the base layer, as
    GPTQModel computes it. Zeros and scales are read at every call, so in-memory merges stay visible.
    """
    levels, order = cache.get(tensors)
    if order is not None:
        x = x.index_select(-1, order)
    scales = tensors.scales.float() if scales is None else scales
    out = GroupAffineMatmul.apply(x, levels, scales, delta, fp16_weight)
    return out if bias is None else out + bias.to(out.dtype)
