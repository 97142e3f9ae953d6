"""Model evaluation: perplexity over token windows and raw logits for comparing models.

This module owns how the project measures a causal LM: the mean next-token negative
log-likelihood over fixed windows (from :func:`peft_qalora.training.data.token_windows`),
exponentiated. It works for any causal LM that maps ``input_ids`` to logits: a plain
transformers model, a GPTQ-quantized one, or a peft-wrapped one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (GPTQ weights are buffers); CPU if none."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode without gradients, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of one forward pass, for HF models (``.logits``), tuples, or plain tensors."""
    # HF models would otherwise build a KV cache that nothing reads.
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    out: Any = model(input_ids=input_ids, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def nll_sum(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of a batch and the number of predicted tokens.

    Position t predicts token t+1 (the standard causal shift); computed in float32 so fp16
    logits from quantized kernels do not lose precision in the softmax.
    """
    logits = _forward_logits(model, input_ids)[:, :-1].float()
    targets = input_ids[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum")
    return loss.item(), targets.numel()


def mean_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> float:
    """Mean next-token NLL (nats) over all windows; see :func:`perplexity`."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        shape = tuple(windows.shape)
        raise ValueError(f"evaluate: need (n >= 1, seq_len >= 2) windows, got {shape}")
    device = model_device(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity",
                          unit="batch", disable=not progress):
            batch = windows[start:start + batch_size].to(device)
            loss, n = nll_sum(model, batch)
            total, count = total + loss, count + n
    return total / count


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> float:
    """Perplexity: exp of the mean next-token NLL over every predicted token of every window.

    ``windows`` is a ``(n, seq_len)`` LongTensor; labels are the inputs themselves, so each
    window contributes ``seq_len - 1`` predictions. The model's train/eval mode is restored.
    """
    return math.exp(mean_nll(model, windows, batch_size, progress))


def logits_on(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 CPU logits of ``model`` on ``input_ids`` (``(seq,)`` or ``(batch, seq)``).

    For comparing models (e.g. a merged checkpoint against the adapter it came from): the
    result is detached and on CPU whatever the model's device or dtype.
    """
    ids = input_ids.unsqueeze(0) if input_ids.ndim == 1 else input_ids
    with eval_mode(model):
        logits = _forward_logits(model, ids.to(model_device(model)))
    logits = logits.float().cpu()
    return logits[0] if input_ids.ndim == 1 else logits
