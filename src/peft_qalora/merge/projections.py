"""The shared random projections of QA-VeRA, and a layer's factors from them (torch only).

Design note. VeRA (Kopiczko et al., 2024) freezes two random matrices shared by every adapted layer and
trains two vectors per layer: `dW = diag(b) B diag(d) A`. Here `A` acts on the group-POOLED input (the sum
of each pooling group's inputs, `pooling.py`), so `A` is (r, n_pool_max) and `B` is (out_max, r), sized to
the widest targeted layer; a layer uses the first `n_pool` columns of `A` and the first `out` rows of `B`.
The update is then exactly a QA-LoRA update with `A_eff = d[:, None] * A` and `B_eff = b[:, None] * B`
and scaling 1, and merges into zero points the same way.

Both matrices come from `torch.Generator(device="cpu").manual_seed(key)`, Kaiming-uniform over their own
fan-in, `A` first: the same recipe (and so the same numbers) as peft's `VeraModel` for the same shapes.
"""

from __future__ import annotations

import math

import torch


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(rows, cols) float32 uniform in +-sqrt(6 / cols): Kaiming-uniform, gain sqrt(2), fan-in = cols."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape, device=generator.device).uniform_(-bound, bound, generator=generator)


def shared_projections(key: int, r: int, n_pool_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, n_pool_max) and B (out_max, r), float32, generated on the CPU from `key` alone."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    A = kaiming_uniform((r, n_pool_max), generator)
    B = kaiming_uniform((out_max, r), generator)
    return A, B


def vera_factors(A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor,
                 n_pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's QA-LoRA factors (r, n_pool) and (out, r) from the shared projections and its vectors d (r,), b (out,)."""
    A_eff = d[:, None] * A[:, :n_pool].to(d)  # (r, n_pool)
    B_eff = b[:, None] * B[: b.shape[0]].to(b)  # (out, r)
    return A_eff, B_eff
