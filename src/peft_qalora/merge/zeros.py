"""Turning an adapter's per-group update into new integer zero points.

Design note. With group-sum pooling the adapter's dense update is constant inside each
quantization group: `dW[i, o] = delta[g(i), o]`. GPTQ dequantizes `W = s * (q - z)`, so moving the
zero by `k` steps changes the weight by `s * k`; the real shift that reproduces `delta` is
`t = delta / s` (in quantization steps) and the merged zero is `z' = z - round(t)`, kept inside the
portable range [1, 2^b - 1] (v1) or [0, 2^b - 1] (v2). Codes, scales and g_idx never change.

Strategies (how `t` becomes an integer):
- `nearest`: round each shift on its own; erases every shift below half a step.
- `calibrated`: GPTQ's error feedback applied to the shifts: round group by group, pushing each
  rounding error onto the groups not yet rounded through the inverse of `H = E[P(x) P(x)^T]`,
  the second moment of the pooled inputs on calibration text.
- `exact`: training already used integer shifts (see `layer.py`), so rounding is the identity.

This module is pure tensor math, shared by the in-memory merge and the file-to-file merge.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..gptq.tensors import portable_zero_range


@dataclass
class LayerMergeStats:
    """What one layer's merge did. Errors are in quantization steps."""

    zeros: int
    moved: int
    clamped: int
    max_rounding_error: float
    mean_rounding_error: float
    mean_abs_shift: float
    unportable_base_zeros: int

    def to_dict(self) -> dict:
        return asdict(self)


def group_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, factor: int = 1) -> torch.Tensor:
    """(n_quant_groups, out) float32 weight update of every quantization group, contiguous.

    Args:
        A: (r, n_pool_groups) and B: (out, r), the adapter in the group-sum convention.
        factor: quantization groups per pooling group.
    """
    delta = (A.float().T * scaling) @ B.float().T  # (n_pool_groups, out), row-major like the scales
    return delta if factor == 1 else delta.repeat_interleave(factor, dim=0)  # (n_quant_groups, out)


def trained_scales(scales: torch.Tensor, scale_delta: torch.Tensor) -> torch.Tensor:
    """The fp16 scales a checkpoint stores for a trained factor: `fp16(s * (1 + c))`."""
    return (scales.float() * (1 + scale_delta.float())).half()


@dataclass
class CodeMoments:
    """Per-(group, column) sums of a layer's integer codes, enough for exact column norms of any
    `s * (q - z) + delta` weight without building it: O(groups x out) after one pass over the codes."""

    sum_q: torch.Tensor  # (G, out) int32, sum of q over the group's inputs
    sum_q2: torch.Tensor  # (G, out) int32, sum of q^2 (8 bits, 4096 inputs a group: 2.7e8 < 2^31)
    count: torch.Tensor  # (G,) int64, inputs per group (act-order groups are scattered, not always equal)


def code_moments(codes: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> CodeMoments:
    """Moments of (in, out) integer codes grouped by `g_idx`: integer sums, so any summation order gives them.
    Kept as int32 (8 bytes a group and column: 0.06 byte a weight at group 128)."""
    q = codes.to(torch.int64)
    g = g_idx.to(device=q.device, dtype=torch.long)
    sum_q = torch.zeros(n_groups, q.shape[1], dtype=torch.int64, device=q.device).index_add_(0, g, q)
    sum_q2 = torch.zeros(n_groups, q.shape[1], dtype=torch.int64, device=q.device).index_add_(0, g, q * q)
    if sum_q2.numel() and int(sum_q2.max()) >= 2**31:
        raise ValueError("merge: a quantization group too large for int32 code moments (over 33,000 inputs at 8 bits).")
    return CodeMoments(sum_q.to(torch.int32), sum_q2.to(torch.int32), torch.bincount(g, minlength=n_groups))


def column_norms(moments: CodeMoments, zeros: torch.Tensor, scales: torch.Tensor,
                 delta: torch.Tensor | None = None) -> torch.Tensor:
    """(out,) float64 norms of the columns of `W = s * (q - z) + delta` (per group), from the code moments:
    `sum_i (s u_i + d)^2 = s^2 sum u^2 + 2 s d sum u + n d^2` with `u = q - z`."""
    z, s, n = zeros.double(), scales.double(), moments.count.double()[:, None]
    q1, q2 = moments.sum_q.double(), moments.sum_q2.double()
    sum_u = q1 - n * z
    sq = s * s * (q2 - 2 * z * q1 + n * z * z)
    if delta is not None:
        d = delta.double()
        sq = sq + 2 * s * d * sum_u + n * d * d
    return sq.sum(0).clamp_min(1e-30).sqrt()


def dora_factor(magnitude: torch.Tensor, base_norms: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """(out,) float64 DoRA column factor `m / ||W'||` with `m = (1 + magnitude) * ||W||` (magnitude relative to
    the base column norm, 0 at the start: the factor is then exactly 1)."""
    return (1 + magnitude.double()) * base_norms / norms


def dora_scales(scales: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The fp16 scales a checkpoint stores for a DoRA column factor: `fp16(s * f)` (one rounding, from float64)."""
    return (scales.double() * factor.double()[None, :]).half()


def merged_scales(scales: torch.Tensor, zeros: torch.Tensor, new_zeros: torch.Tensor,
                  scale_delta: torch.Tensor | None = None, magnitude: torch.Tensor | None = None,
                  moments: CodeMoments | None = None, delta: torch.Tensor | None = None,
                  name: str = "") -> torch.Tensor | None:
    """The fp16 scales a merge writes for trained scales and/or a DoRA magnitude; None if neither changes them.

    The DoRA norm is taken of the merged weight `s' * (q - new_zeros)`, or with a float `delta` (float-zero
    formats such as GGUF's Q4_1) of `s' * (q - zeros) + delta`: exactly what training computed for the
    matching strategy, through this same function.
    """
    if scale_delta is None and magnitude is None:
        return None
    trained = trained_scales(scales, scale_delta) if scale_delta is not None else scales.half()
    if magnitude is not None:
        base_norms = column_norms(moments, zeros, scales)
        norms = column_norms(moments, zeros, trained, delta) if delta is not None else column_norms(moments, new_zeros,
                                                                                                      trained)
        trained = dora_scales(trained, dora_factor(magnitude, base_norms, norms))
    return checked_scales(trained, scales, name)


def checked_scales(trained: torch.Tensor, scales: torch.Tensor, name: str = "") -> torch.Tensor:
    """`trained`, refused where fp16 turned a scale to Inf or NaN, or to 0 where the base's was not: a merge must
    never publish a layer whose weights vanished or blew up (and the writers' own later checks would refuse it)."""
    bad = ~torch.isfinite(trained) | ((trained == 0) & (scales != 0))
    if bool(bad.any()):
        value = float(trained[bad].flatten()[0])
        raise ValueError(f"merge: the trained scales of {name or 'a layer'} give a scale of {value} in {int(bad.sum())} "
                         "groups (beyond fp16, or zero); the adapter's scale factors are broken (an extreme value in "
                         "qalora_scale): train it again or merge another checkpoint of it.")
    return trained


def merge_zeros(
    zeros: torch.Tensor,
    scales: torch.Tensor,
    delta: torch.Tensor,
    bits: int,
    strategy: str = "nearest",
    hessian: torch.Tensor | None = None,
    zero_format: int = 1,
) -> tuple[torch.Tensor, LayerMergeStats]:
    """New true zeros for one layer.

    Args:
        zeros: (n_groups, out) integer true zeros of the base.
        scales: (n_groups, out) scales.
        delta: (n_groups, out) float weight update of every group (constant inside the group).
        bits: bit width.
        strategy: "nearest", "calibrated" (needs `hessian`) or "exact".
        hessian: (n_groups, n_groups) second moment of the group-pooled inputs, for "calibrated".
        zero_format: 1 (portable v1 range [1, 2^b - 1]) or 2 ([0, 2^b - 1]).
    Returns:
        (n_groups, out) int32 merged true zeros and the layer's statistics.
    """
    # Float32 throughout, one integer conversion at the end, few passes: mixed int/float arithmetic and
    # integer rounding run ~5x slower in torch on the CPU, and a 7B model has 200M zeros.
    shift = delta.float() / scales.float()  # (n_groups, out), in quantization steps
    # exact adapters trained with shifts clamped to the v1 range (`LayerCache.shift_min/max`): a v2 output must
    # clamp them the same way, or it would not be the trained model
    low, high = portable_zero_range(bits, 1 if strategy == "exact" else zero_format)
    zeros_f = zeros.float()
    if strategy == "calibrated":
        if hessian is None:
            raise ValueError("merge: strategy='calibrated' needs calibration statistics; run calibrate() first.")
        steps = calibrated_round(delta.float(), scales.float(), hessian, zeros.to(torch.int32), low, high).float()
    elif strategy in ("nearest", "exact"):
        steps = torch.round(shift)
    else:
        raise ValueError(f"merge: unknown strategy {strategy!r}; expected 'nearest', 'calibrated' or 'exact'.")
    merged = torch.sub(zeros_f, steps).clamp_(low, high)
    return merged.to(torch.int32), layer_stats(zeros_f, merged, steps, shift, low, high)


def layer_stats(zeros: torch.Tensor, merged: torch.Tensor, steps: torch.Tensor, shift: torch.Tensor, low: int,
                high: int) -> LayerMergeStats:
    """The report's numbers for one layer from float32 tensors: base and merged zeros, the rounded
    steps before the clamp, the real shifts. Few passes; raises on a non-finite update,
    before anything is written."""
    if not zeros.numel():
        return LayerMergeStats(0, 0, 0, 0.0, 0.0, 0.0, 0)
    n = zeros.numel()
    abs_shift = float(shift.abs().sum())
    if not math.isfinite(abs_shift):
        check_finite(shift, "adapter update")  # raises, naming the problem
    applied = zeros - merged  # steps actually moved, after the clamp
    error = torch.sub(shift, applied).abs_()
    max_error = float(error.max())
    # unclamped rounding errs by at most half a step and a clamp by at least half a step (a tie rounded away
    # from the bound: shift 1.5, zero 2, low 1), so only an error below half a step everywhere rules clamps out
    clamped = int(torch.count_nonzero(applied != steps)) if max_error >= 0.5 - 1e-6 else 0
    zmin, zmax = torch.aminmax(zeros)
    unportable = 0 if low <= zmin and zmax <= high else int(((zeros < low) | (zeros > high)).sum())
    return LayerMergeStats(
        zeros=n,
        moved=int(applied.count_nonzero()),
        clamped=clamped,
        max_rounding_error=max_error,
        mean_rounding_error=float(error.sum()) / n,
        mean_abs_shift=abs_shift / n,
        unportable_base_zeros=unportable,
    )


def calibrated_round(
    delta: torch.Tensor, scales: torch.Tensor, hessian: torch.Tensor, zeros: torch.Tensor, low: int, high: int
) -> torch.Tensor:
    """Round the shifts with GPTQ-style error feedback; returns integer steps (n_groups, out).

    The output error of column o is `e_o^T H e_o` with `e_o[g] = s[g, o] * k[g, o] - delta[g, o]`, so
    rounding `delta` onto the per-element grid `s * Z` is exactly GPTQ's problem with a shared H:
    one Cholesky factor of H^-1 serves every output column at once. A column keeps nearest rounding
    where that happens to be better (greedy error feedback is not optimal), so calibrated is never
    worse than nearest on the calibration statistics.
    """
    n_groups = delta.shape[0]
    eye = torch.eye(n_groups, dtype=torch.float64, device=hessian.device)
    h = hessian.double() + 0.01 * torch.diagonal(hessian.double()).mean().clamp_min(1e-12) * eye
    hinv_chol = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (G, G)
    target = delta.double().clone()  # (G, out), updated in place as errors are fed forward
    steps = torch.empty_like(zeros)
    lo_steps, hi_steps = zeros - high, zeros - low  # steps that keep z - k inside [low, high]
    for g in range(n_groups):
        k = torch.round(target[g] / scales[g]).clamp(lo_steps[g], hi_steps[g])  # (out,)
        steps[g] = k.to(torch.int32)
        err = (target[g] - k * scales[g]) / hinv_chol[g, g]  # (out,)
        target[g + 1 :] -= hinv_chol[g, g + 1 :, None] * err[None, :]
    steps = refine_steps(steps, delta, scales, hessian, lo_steps, hi_steps)
    nearest = torch.round(delta / scales).clamp(lo_steps, hi_steps).to(torch.int32)
    better = output_error(steps, delta, scales, hessian) <= output_error(nearest, delta, scales, hessian)  # (out,)
    return torch.where(better[None, :], steps, nearest)


def refine_steps(steps, delta, scales, hessian, lo_steps, hi_steps, sweeps: int = 4) -> torch.Tensor:
    """Coordinate descent after the greedy pass: move single steps by +-1 while the error drops.

    Changing `k[g]` by `d` changes column error by `2 d s_g (H e)_g + d^2 s_g^2 H_gg`, so each
    trial is O(out) with `He` kept up to date.
    """
    h = hessian.double()
    s = scales.double()
    k = steps.double().clone()
    err = k * s - delta.double()  # (G, out)
    he = h @ err  # (G, out)
    for _ in range(sweeps):
        changed = False
        for g in range(k.shape[0]):
            for d in (1.0, -1.0):
                gain = 2 * d * s[g] * he[g] + s[g] ** 2 * h[g, g]  # (out,)
                ok = (gain < -1e-12) & (k[g] + d >= lo_steps[g]) & (k[g] + d <= hi_steps[g])
                if ok.any():
                    step = d * ok.double()  # (out,)
                    k[g] += step
                    he += h[:, g, None] * (step * s[g])[None, :]
                    changed = True
        if not changed:
            break
    return k.to(torch.int32)


def output_error(steps: torch.Tensor, delta: torch.Tensor, scales: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(out,) expected squared output error `e^T H e` of every column for integer `steps`."""
    err = (steps.double() * scales.double() - delta.double())  # (G, out)
    return torch.einsum("go,gh,ho->o", err, hessian.double(), err)


def check_finite(tensor: torch.Tensor, what: str) -> None:
    # one pass: a sum is finite only if every term is (or values so large the adapter is broken anyway)
    if not bool(torch.isfinite(tensor.sum())):
        raise ValueError(f"merge: the {what} holds NaN or Inf; the adapter is broken, retrain or load another one.")


def total_stats(per_layer: dict[str, LayerMergeStats]) -> dict:
    """Sum counts and combine errors over layers for the merge report."""
    stats = list(per_layer.values())
    zeros = sum(s.zeros for s in stats)
    return {
        "layers": len(stats),
        "zeros": zeros,
        "moved": sum(s.moved for s in stats),
        "clamped": sum(s.clamped for s in stats),
        "max_rounding_error": max((s.max_rounding_error for s in stats), default=0.0),
        "mean_rounding_error": sum(s.mean_rounding_error * s.zeros for s in stats) / max(zeros, 1),
        "mean_abs_shift": sum(s.mean_abs_shift * s.zeros for s in stats) / max(zeros, 1),
        "unportable_base_zeros": sum(s.unportable_base_zeros for s in stats),
    }
