"""Independent reference implementations for tests: naive, loop-based, written from the format spec."""

from __future__ import annotations

import torch


def naive_unpack(words: torch.Tensor, bits: int, n_values: int, along_rows: bool) -> torch.Tensor:
    """Read values as a little-endian bit stream of 32-bit words (value j at bits [j*bits, j*bits+bits))."""
    w = words if along_rows else words.T
    w = w.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n_values, w.shape[1], dtype=torch.int64)
    for col in range(w.shape[1]):
        stream = 0
        for k in range(w.shape[0]):
            stream |= int(w[k, col]) << (32 * k)
        for j in range(n_values):
            out[j, col] = (stream >> (j * bits)) & ((1 << bits) - 1)
    return out if along_rows else out.T


def dense_weight(qweight, qzeros, scales, g_idx, bits, zero_offset=1) -> torch.Tensor:
    """(out, in) float32 weight from checkpoint tensors, v1 zeros (field + 1)."""
    in_features, out_features = g_idx.numel(), scales.shape[1]
    q = naive_unpack(qweight, bits, in_features, along_rows=True)  # (in, out)
    z = naive_unpack(qzeros, bits, out_features, along_rows=False) + zero_offset  # (G, out)
    w = torch.empty(in_features, out_features)
    for i in range(in_features):
        g = int(g_idx[i])
        w[i] = scales[g].float() * (q[i].float() - z[g].float())
    return w.T


def dense_delta(A, B, scaling, g_idx, factor=1) -> torch.Tensor:
    """(out, in) dW[o, i] = scaling * (B A)[o, pool(i)], built column by column."""
    BA = scaling * (B.float() @ A.float())  # (out, n_pool)
    cols = [BA[:, int(g_idx[i]) // factor] for i in range(g_idx.numel())]
    return torch.stack(cols, dim=1)


def assert_layer_matches(layer, W, pairs, grad_atol: float, min_grad: float = 1e-3) -> None:
    """The layer's output and gradients against autograd through the dense (in, out) reference weight `W`.

    `pairs`: (parameter of the layer, its reference copy that W was built from). Gradients may differ by
    `grad_atol` times their largest value (the layer rounds weights to fp16 where the merge stores them)."""
    x = torch.randn(3, layer.in_features)
    grad_y = torch.randn(3, layer.out_features)
    out = layer(x)
    out.backward(grad_y)
    (x @ W).backward(grad_y)
    torch.testing.assert_close(out.detach(), (x @ W).detach(), rtol=2e-3, atol=2e-3)
    for got, ref in pairs:
        assert ref.grad.abs().max() > min_grad  # every gradient is exercised
        torch.testing.assert_close(got.grad, ref.grad, rtol=2e-3, atol=grad_atol * float(ref.grad.abs().max()))
