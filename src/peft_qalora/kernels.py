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
several times the arithmetic that fills it.
"""

from __future__ import annotations

import threading

import torch

from .gptq.tensors import QuantTensors, portable_zero_range


class LayerCache:
    """What the kernel and the adapter derive from one GPTQ layer's tensors, rebuilt when they change
    (an in-memory merge or unmerge writes qzeros and scales in place, which bumps their version).

    levels: `q - z` as int8 (int16 at 8 bits), (G, gs, out) in group order; order: the input
    permutation that makes groups contiguous, or None; scales: (G, out) float32; shift_min, shift_max:
    (G, out) float32 bounds on the integer zero shifts that keep merged zeros portable (gptq.tensors).
    """

    def __init__(self):
        self.key: tuple | None = None
        self.levels = self.order = self.scales = self.shift_min = self.shift_max = None

    def get(self, tensors: QuantTensors) -> "LayerCache":
        key = tuple((t.data_ptr(), t._version) for t in (tensors.qweight, tensors.qzeros, tensors.scales))
        if key != self.key:
            g_idx = tensors.g_idx.long()
            order = torch.argsort(g_idx, stable=True)
            contiguous = bool(torch.equal(order, torch.arange(g_idx.numel(), device=order.device)))
            codes = tensors.codes() if contiguous else tensors.codes()[order]  # (in, out), group order
            zeros = tensors.zeros()
            levels = codes.view(tensors.n_groups, tensors.group_size, tensors.out_features) - zeros[:, None, :]
            self.levels = levels.to(torch.int16 if tensors.bits == 8 else torch.int8)  # |q - z| < 2^bits
            self.order = None if contiguous else order
            self.scales = tensors.scales.float()
            low, high = portable_zero_range(tensors.bits)
            self.shift_min, self.shift_max = zeros.float() - high, zeros.float() - low
            self.key = key
        return self


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


# What the adapter alone adds to the layer's forward and backward (benchmarks time these apart).

def pool_groups(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(..., in) in group order -> (..., G): the sum of each group's inputs (as a matmul with ones,
    faster on a CPU than a sum over a short innermost dimension)."""
    groups = x.unflatten(-1, (n_groups, -1))
    return groups @ torch.ones(groups.shape[-1], dtype=x.dtype, device=x.device)


class _LastPooled:
    """The last input pooled and its result: q, k and v (and gate and up) read the same tensor, so
    their adapters pool it once. The input is held, so its address cannot be reused meanwhile."""

    def __init__(self):
        self.key, self.x, self.pooled = None, None, None

    def __call__(self, x: torch.Tensor, n_groups: int) -> torch.Tensor:
        key = (x.device, x.data_ptr(), x._version, x.shape, x.stride(), x.dtype, n_groups)
        if key != self.key:
            self.key, self.x, self.pooled = key, x, pool_groups(x, n_groups)
        return self.pooled


_pooled = threading.local()


def pooled_input(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    last = _pooled.__dict__.setdefault("last", _LastPooled())
    return last(x, n_groups)


def delta_grad(pooled: torch.Tensor, flat_grad: torch.Tensor) -> torch.Tensor:
    """(G, out) gradient of the per-group delta: each weight of a group gets it, so P(x)^T @ grad_y."""
    return pooled.reshape(-1, pooled.shape[-1]).T @ flat_grad


def scales_grad(x: torch.Tensor, flat_grad: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(G, out) gradient of trained scales: the dense weight gradient x^T @ grad_y, weighted by q - z
    and summed per group. A full matmul: what training every weight's scale costs."""
    grad_weight = x.reshape(-1, x.shape[-1]).T @ flat_grad  # (in, out)
    return (grad_weight.view(levels.shape) * levels).sum(1)


class GroupAffineMatmul(torch.autograd.Function):
    """y = x @ W, W = levels * S + D per group (see the module note); x is in group order.

    Gradients reach S and D if they require them (straight-through the fp16 rounding); levels are
    constant. Saved for backward: levels, S, D, the pooled x (for D) and x itself only for S.
    """

    @staticmethod
    def forward(ctx, x, levels, S, D, fp16_weight):
        weight = group_affine_weight(levels, S, D, x.dtype, fp16_weight)
        pooled = pooled_input(x, levels.shape[0]) if D is not None and D.requires_grad else None
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
            grad_D = delta_grad(pooled.to(ctx.dtype), flat_grad).to(D.dtype)
        if ctx.needs_input_grad[2]:
            grad_S = scales_grad(x, flat_grad, levels).to(S.dtype)
        return grad_x, None, grad_S, grad_D, None


def gptq_linear_forward(cache: LayerCache, tensors: QuantTensors, x: torch.Tensor, bias=None, scales=None,
                        delta=None, fp16_weight: bool = True) -> torch.Tensor:
    """(..., in) -> (..., out): the layer with weight `(q - z) * scales + delta` per group.

    `scales` default to the layer's own, `delta` (G, out) to none: then this is the base layer, as
    GPTQModel computes it. The cache follows the layer's qzeros and scales by their version, so an
    in-memory merge is visible at the next call.
    """
    cache = cache.get(tensors)
    if cache.order is not None:
        x = x.index_select(-1, cache.order)
    scales = cache.scales if scales is None else scales
    out = GroupAffineMatmul.apply(x, cache.levels, scales, delta, fp16_weight)
    return out if bias is None else out + bias.to(out.dtype)
