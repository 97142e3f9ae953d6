"""Calibration statistics for the `calibrated` merge: second moments of the group-pooled inputs.

For every QA-LoRA layer, `H = E[P_q(x) P_q(x)^T]` (n_quant_groups x n_quant_groups), where `P_q`
sums the inputs of each quantization group. The output error of rounding the zero shifts of
column o by `e_o` (in weight units per group) is exactly `e_o^T H e_o`, which `merge.zeros.calibrated_round`
minimises group by group.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..evaluate import eval_mode, model_device
from ..tuners.qalora.layer import QALoraLayer


def calibrate(peft_model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run `windows` through the model, store H in every layer (for all its adapters), return them by name."""
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, QALoraLayer)}
    sums = {n: torch.zeros(m.pool.n_groups, m.pool.n_groups, dtype=torch.float64, device=m.base_device())
            for n, m in layers.items()}
    device = model_device(peft_model)
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def accumulate(module, args):
            pooled = module.pool(args[0].detach().float()).reshape(-1, module.pool.n_groups).double()
            sums[name] += pooled.T @ pooled
            counts[name] += pooled.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with eval_mode(peft_model), torch.no_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc="calibrating", disable=not progress):
                peft_model(input_ids=windows[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    hessians = {n: (sums[n] / max(counts[n], 1)).float() for n in layers}
    for name, layer in layers.items():
        for adapter in layer.r:
            layer.pooled_hessian[adapter] = hessians[name]
    return hessians
