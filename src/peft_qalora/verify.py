"""Checking a merged checkpoint with a loader we did not write (transformers + GPTQModel)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import PeftModel

from .evaluate import logits_on, perplexity
from .base.load import load_gptq_model


def verify_merge(out_dir, base_dir, adapter_dir, sample: torch.Tensor, eval_windows: torch.Tensor | None = None,
                 strategy: str | None = None) -> dict:
    """Compare the exported checkpoint with our in-memory merge and the unmerged adapter model.

    Args:
        sample: (batch, seq) token ids for the logit comparison.
        eval_windows: held-out windows for perplexities (base, adapter, merged); skipped if None.
    """
    start = time.perf_counter()
    exported = load_gptq_model(Path(out_dir))
    adapter = PeftModel.from_pretrained(load_gptq_model(Path(base_dir)), str(adapter_dir)).eval()
    result = {}
    exported_logits, adapter_logits = logits_on(exported, sample), logits_on(adapter, sample)
    if eval_windows is not None:
        with adapter.disable_adapter():
            result["ppl_base"] = perplexity(adapter, eval_windows)
        result["ppl_adapter"] = perplexity(adapter, eval_windows)
        result["ppl_merged"] = perplexity(exported, eval_windows)
    merged = adapter.merge_and_unload(strategy=strategy)
    merged_logits = logits_on(merged, sample)
    result.update(
        max_abs_diff_exported_vs_in_memory=float((exported_logits - merged_logits).abs().max()),
        max_abs_diff_exported_vs_adapter=float((exported_logits - adapter_logits).abs().max()),
        matches_in_memory=bool(torch.allclose(exported_logits, merged_logits, rtol=1e-3, atol=1e-3)),
        seconds=time.perf_counter() - start,
    )
    return result
