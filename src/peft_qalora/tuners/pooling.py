"""Group pooling, the heart of QA-LoRA.

Design note. A GPTQ layer stores one (scale, zero) per (input group, output column). If the
adapter only ever sees `P(x)[g] = sum_{i in group g} x_i` (the paper's Algorithm 1: average pooling
times the group size), its dense update is constant inside each group,
`dW[o, i] = scaling * (B A)[o, g(i)]`, and so it folds into the zero points with no group-size
factor. Groups are read from the layer's own `g_idx`, so act-order checkpoints (scattered group
members) pool correctly. A pooling group may be a union of `factor` consecutive quantization groups
(`g // factor`), which is still mergeable; a finer one never is.

Every group of a GPTQ layer has exactly `group_size` members, so pooling is a gather by the order
that sorts `g_idx`, a reshape and a sum: no scatter, and an identity gather is skipped.
"""

from __future__ import annotations

import torch


class GroupPooling(torch.nn.Module):
    """Sums the inputs of each pooling group.

    Args:
        g_idx: the quantization group of every input feature, shape (in_features,).
        factor: quantization groups per pooling group (1 = pool exactly the quantization groups).
        device: where the index buffers live, the inputs' device (default: g_idx's). GPTQModel may keep
            g_idx on the CPU while the codes are on a GPU, so a layer passes its codes' device.
    """

    def __init__(self, g_idx: torch.Tensor, factor: int = 1, device: torch.device | str | None = None):
        super().__init__()
        g_idx = g_idx.to(torch.long)
        device = g_idx.device if device is None else torch.device(device)
        self.in_features = g_idx.numel()
        self.n_quant_groups = int(g_idx.max()) + 1 if self.in_features else 0
        check_equal_groups(g_idx, self.n_quant_groups)
        if self.n_quant_groups % factor:
            raise ValueError(
                f"pooling: {self.n_quant_groups} quantization groups do not split into pooling groups of "
                f"{factor}; choose a pooling group size that divides in_features."
            )
        self.factor = factor
        self.n_groups = self.n_quant_groups // factor
        pool_idx = g_idx // factor  # (in,)
        order = torch.argsort(pool_idx, stable=True)
        self.contiguous = bool(torch.equal(order, torch.arange(self.in_features, device=order.device)))
        self.register_buffer("order", order.to(device), persistent=False)
        self.register_buffer("pool_idx", pool_idx.to(device), persistent=False)
        # (n_quant_groups,) -> pooling group of every quantization group
        self.register_buffer("quant_to_pool", torch.arange(self.n_quant_groups, device=device) // factor,
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., n_groups)."""
        if not self.contiguous:
            x = x.index_select(-1, self.order)
        return x.unflatten(-1, (self.n_groups, -1)).sum(-1)

    def expand(self, group_values: torch.Tensor) -> torch.Tensor:
        """(..., n_groups) per-group values -> (..., in_features), each input taking its group's value."""
        return group_values.index_select(-1, self.pool_idx)


def check_equal_groups(g_idx: torch.Tensor, n_groups: int) -> None:
    """GPTQ groups all have the same size; anything else is not a GPTQ g_idx."""
    counts = torch.bincount(g_idx, minlength=n_groups)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"pooling: g_idx groups have unequal sizes (min {int(counts.min())}, max {int(counts.max())}); "
            "QA-LoRA needs a GPTQ layer whose every group has group_size inputs."
        )


def contiguous_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The g_idx of a layer quantized without act-order."""
    return torch.arange(in_features, dtype=torch.int32, device=device) // group_size
