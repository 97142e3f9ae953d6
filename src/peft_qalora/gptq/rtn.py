"""Round-to-nearest GPTQ-format quantization of a float weight: small, exact, and independent of
GPTQModel, for building test checkpoints and as the reference of the format's math."""

from __future__ import annotations

import torch

from .packing import pack_rows
from .tensors import QuantTensors, encode_zeros


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, g_idx: torch.Tensor | None = None, zero_format: int = 1
) -> QuantTensors:
    """Asymmetric min/max quantization of `weight` (out, in) with true zeros kept in [1, 2^b - 1].

    Args:
        g_idx: (in,) group of every input; default contiguous groups of `group_size`.
    """
    out_features, in_features = weight.shape
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    n_groups = in_features // group_size
    maxq = (1 << bits) - 1
    w = weight.T.float()  # (in, out)
    order = torch.argsort(g_idx.long(), stable=True)
    grouped = w[order].reshape(n_groups, group_size, out_features)  # (G, gs, out)
    wmin = grouped.amin(1).clamp(max=0)
    wmax = grouped.amax(1).clamp(min=0)
    scales = ((wmax - wmin) / (maxq - 1)).clamp(min=1e-5).half()  # one level spare so z >= 1 fits
    zeros = torch.round(-wmin / scales.float()).clamp(1, maxq).to(torch.int32)  # (G, out)
    g = g_idx.long()
    codes = torch.round(w / scales.float()[g] + zeros[g]).clamp(0, maxq).to(torch.int32)  # (in, out)
    return QuantTensors(
        qweight=pack_rows(codes, bits),
        qzeros=encode_zeros(zeros, bits, zero_format),
        scales=scales,
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        zero_format=zero_format,
    )
