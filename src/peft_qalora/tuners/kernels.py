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

Memory per weight (the code cache). The levels `q - z` can be kept per layer as int8 (`LayerCache`,
1 byte a weight beside the 0.5 byte of packed 4-bit codes: 1.5 bytes, 105 GB for a 70B model's
linears), or unpacked from the packed codes into one reused per-process buffer at every forward and
again at every backward (the weights stay at their packed size; a step pays two more passes over the
codes). `set_code_cache("all" | "none" | bytes)` or `PEFT_QALORA_CODE_CACHE` chooses: "all" (the
default, today's speed), "none", or a budget in bytes ("8GB", "512MiB", 8e9) that caches layers in
the order they first run until the cache would exceed it. Either way the levels are the same
integers, so outputs and gradients are bit for bit the same. A runtime setting of this process: no
adapter file records it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import weakref

import torch

from ..gptq.tensors import QuantTensors, portable_zero_range

CODE_CACHE_ENV = "PEFT_QALORA_CODE_CACHE"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_code_cache(value) -> str | int:
    """"all", "none", or a budget in bytes (an int, or a string like "8GB", "512MiB", "1.5e9"; 0 = "none")."""
    if isinstance(value, bool):
        raise ValueError(f"code_cache={value!r}: expected 'all', 'none' or a budget in bytes such as '8GB'.")
    if isinstance(value, (int, float)):
        budget = value
    else:
        text = str(value).strip().lower()
        if text in ("all", "none"):
            return text
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?", text)
        if not match:
            raise ValueError(f"code_cache={value!r}: expected 'all', 'none' or a budget in bytes such as '8GB', "
                             "'512MiB' or 8000000000.")
        budget = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if not budget >= 0 or budget == float("inf"):
        raise ValueError(f"code_cache={value!r}: a budget must be a finite number of bytes >= 0.")
    return "none" if budget == 0 else int(budget)


class _CachePolicy:
    """The process's code-cache setting and the bytes of levels every live LayerCache holds."""

    def __init__(self):
        self.lock = threading.Lock()
        self.value: str | int | None = None  # None: read the environment at first use
        self.generation = 0
        self.holders: "weakref.WeakSet[LayerCache]" = weakref.WeakSet()

    def current(self) -> str | int:
        if self.value is None:
            self.value = parse_code_cache(os.environ.get(CODE_CACHE_ENV, "all") or "all")
        return self.value

    def held(self) -> int:
        return sum(c._levels.nbytes for c in list(self.holders) if c._levels is not None)

    def admit(self, cache: "LayerCache", nbytes: int) -> bool:
        with self.lock:
            policy = self.current()
            if policy == "all" or (policy != "none" and self.held() + nbytes <= policy):
                self.holders.add(cache)
                return True
            return False


_policy = _CachePolicy()


def set_code_cache(value="all") -> str | int:
    """Set this process's code cache: "all" (keep every layer's int8 `q - z`, the default), "none"
    (unpack the packed codes at every forward and backward), or a budget in bytes; None re-reads
    $PEFT_QALORA_CODE_CACHE. Layers re-decide at their next call. Returns the parsed setting."""
    with _policy.lock:
        _policy.value = None if value is None else parse_code_cache(value)
        _policy.generation += 1
        return _policy.current()


def code_cache() -> str | int:
    """This process's code-cache setting ("all", "none" or a budget in bytes)."""
    return _policy.current()


def code_cache_bytes() -> int:
    """Bytes of int8/int16 levels the live layer caches of this process hold now."""
    return _policy.held()


class LayerCache:
    """What the kernel and the adapter derive from one GPTQ layer's tensors, rebuilt when they change
    (an in-memory merge or unmerge writes qzeros and scales in place, which bumps their version).

    levels: `q - z` as int8 (int16 at 8 bits), (G, gs, out) in group order: the cached tensor, or
    (code cache off or over budget) unpacked from the packed codes into a reused buffer, valid until the
    next unpack in this thread; source: what the kernel reads them from, at forward and again at
    backward; order: the input permutation that makes groups contiguous, or None; scales: (G, out)
    float32; zeros: (G, out) true zeros; shift_min, shift_max: (G, out) float32 bounds on the integer
    zero shifts that keep merged zeros portable (gptq.tensors), computed when read.
    """

    def __init__(self):
        self.key: tuple | None = None
        self.generation = -1
        self._levels = self._packed = self.order = self.scales = self.zeros = None
        self.bits = None

    def get(self, tensors: QuantTensors) -> "LayerCache":
        key = tuple((t.data_ptr(), t._version) for t in (tensors.qweight, tensors.qzeros, tensors.scales))
        if key != self.key:
            g_idx = tensors.g_idx.long()
            order = torch.argsort(g_idx, stable=True)
            contiguous = bool(torch.equal(order, torch.arange(g_idx.numel(), device=order.device)))
            # on the codes' device: GPTQModel may move g_idx to the CPU when the layer runs on a GPU
            self.order = None if contiguous else order.to(tensors.qweight.device)
            self.bits = tensors.bits
            self.zeros = tensors.zeros().to(_level_dtype(tensors.bits))  # |q - z| < 2^bits: int8 (int16 at 8)
            self.scales = tensors.scales.float()
            self._levels, self._packed = None, _PackedLevels(tensors, self.zeros, self.order)
            self.key, self.generation = key, -1
        elif self.generation not in (-1, _policy.generation):  # the setting changed: give the bytes back
            self._levels, self.generation = None, -1
        return self

    @property
    def source(self) -> "torch.Tensor | _PackedLevels":
        """The levels for the kernel: the cached tensor, or the packed codes to unpack. Decided at first
        use (a layer whose kernel never runs, e.g. a GPU loader's kernel with an exact adapter, caches nothing)."""
        if self.generation != _policy.generation:
            self.generation = _policy.generation
            self._levels = None
            if _policy.admit(self, self._packed.numel * _level_dtype(self.bits).itemsize):
                self._levels = self._packed().clone()
        return self._packed if self._levels is None else self._levels

    @property
    def levels(self) -> torch.Tensor:
        source = self.source
        return source if isinstance(source, torch.Tensor) else source()

    @property
    def shift_min(self) -> torch.Tensor:
        return self.zeros.float() - portable_zero_range(self.bits)[1]

    @property
    def shift_max(self) -> torch.Tensor:
        return self.zeros.float() - portable_zero_range(self.bits)[0]


def _level_dtype(bits: int) -> torch.dtype:
    return torch.int16 if bits == 8 else torch.int8


class _PackedLevels:
    """`q - z` (G, gs, out) in group order, unpacked on call from one layer's packed codes into a
    reused buffer (never kept): the code cache's stand-in when the cache is off. Holds references to
    the layer's own qweight and a snapshot of its zeros, so a backward after an in-memory merge still
    recomputes the weight its forward used (like a cached tensor would)."""

    def __init__(self, tensors: QuantTensors, zeros: torch.Tensor, order: torch.Tensor | None):
        self.qweight, self.zeros, self.order, self.bits = tensors.qweight, zeros, order, tensors.bits
        self.shape = (tensors.n_groups, tensors.group_size, tensors.out_features)
        self.numel = tensors.in_features * tensors.out_features
        self.tensors = tensors if tensors.bits not in _FAST_BITS else None  # 3 bits: the generic unpack

    def __call__(self) -> torch.Tensor:
        G, gs, out = self.shape
        dtype = _level_dtype(self.bits)
        levels = _buffer(torch.Size((G * gs, out)), dtype, self.qweight.device, "levels")
        if self.tensors is not None:
            codes = self.tensors.codes()  # 3 bits: the generic unpack (fresh int32 tensors)
            levels.copy_(codes if self.order is None else codes[self.order])
        elif self.order is None:
            _unpack_codes(self.qweight, self.bits, levels)
        else:
            codes = _buffer(torch.Size((G * gs, out)), dtype, self.qweight.device, "codes")
            _unpack_codes(self.qweight, self.bits, codes)
            torch.index_select(codes, 0, self.order, out=levels)
        levels = levels.view(G, gs, out)
        return levels.sub_(self.zeros[:, None, :])


_FAST_BITS = (2, 4, 8) if sys.byteorder == "little" else ()


def _unpack_codes(qweight: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Packed int32 rows (in / pf, n) -> the (in, n) codes written into `out` (int8, int16 at 8 bits),
    reading the words as little-endian bytes: byte k of a word holds values k * 8 / bits onward."""
    rows, n = qweight.shape
    per_byte = 8 // bits
    pf = 4 * per_byte
    in_features = out.shape[0]
    data = qweight.contiguous().view(torch.uint8).view(rows, n, 4)
    if rows * pf != in_features:  # a last word padded past the inputs: unpack whole words, keep the rows
        full = _buffer(torch.Size((rows * pf, n)), out.dtype, out.device, "codes_padded")
        _unpack_codes(qweight, bits, full)
        out.copy_(full[:in_features])
        return
    dest = out.view(rows, 4, per_byte, n)
    if bits == 8:
        dest[:, :, 0, :].copy_(data.transpose(1, 2))
        return
    target = dest.view(torch.uint8)
    mask = (1 << bits) - 1
    for m in range(per_byte):
        field = target[:, :, m, :]
        if m == 0:
            torch.bitwise_and(data.transpose(1, 2), mask, out=field)
        elif m == per_byte - 1:
            torch.bitwise_right_shift(data.transpose(1, 2), bits * m, out=field)
        else:
            torch.bitwise_right_shift(data.transpose(1, 2), bits * m, out=field)
            field.bitwise_and_(mask)


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
    and summed per group. A full matmul: what training every weight's scale costs. The (in, out) product
    lives in a reused buffer and is weighted in place (a fresh one per layer and step is a fresh mmap)."""
    x = x.reshape(-1, x.shape[-1])
    grad_weight = _buffer(torch.Size((x.shape[-1], flat_grad.shape[-1])), x.dtype, x.device,
                          "grad_weight")
    torch.mm(x.T, flat_grad, out=grad_weight)  # (in, out)
    return grad_weight.view(levels.shape).mul_(levels).sum(1)  # (G, out)


class GroupAffineMatmul(torch.autograd.Function):
    """y = x @ W, W = levels * S + D per group (see the module note); x is in group order.

    `levels` is the (G, gs, out) tensor, or a callable giving it (`_PackedLevels`: unpacked again in
    backward). Gradients reach S and D if they require them (straight-through the fp16 rounding);
    levels are constant. Saved for backward: S, D, the pooled x (for D), x itself only for S, and the
    levels' tensor or source (a cached tensor, or the packed codes: no per-call copy is kept).
    """

    @staticmethod
    def forward(ctx, x, levels, S, D, fp16_weight):
        source, levels = levels, levels() if callable(levels) else levels
        weight = group_affine_weight(levels, S, D, x.dtype, fp16_weight)
        pooled = pooled_input(x, levels.shape[0]) if D is not None and D.requires_grad else None
        ctx.fp16_weight, ctx.dtype, ctx.levels = fp16_weight, x.dtype, source
        ctx.save_for_backward(x if S.requires_grad else None, pooled, S, D)
        return x @ weight

    @staticmethod
    def backward(ctx, grad_y):
        x, pooled, S, D = ctx.saved_tensors
        levels = ctx.levels() if callable(ctx.levels) else ctx.levels
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
    in-memory merge is visible at the next call; it holds the levels or unpacks them (`set_code_cache`).
    """
    cache = cache.get(tensors)
    if cache.order is not None:
        x = x.index_select(-1, cache.order)
    scales = cache.scales if scales is None else scales
    out = GroupAffineMatmul.apply(x, cache.source, scales, delta, fp16_weight)
    return out if bias is None else out + bias.to(out.dtype)
