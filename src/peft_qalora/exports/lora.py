"""A QA-LoRA adapter as a standard peft LoRA, for engines that serve adapters on a quantized base
(vLLM `--enable-lora`, peft, transformers).

Design note. A QA-LoRA layer computes `scaling * B A P(x)`, `P` the group sum over the inputs of each
pooling group. Writing the sum as a matrix, `A P(x) = A_std x` with `A_std[:, i] = A[:, p(i)]`, `p(i)`
the pooling group of input `i` (`g_idx[i] // factor`, so act-order is followed, and peft's
`use_qalora` factor is already folded into `A` by `adapters.read_adapter`). `B`, `r`, `lora_alpha`
and rsLoRA stay as they are, so the scaling is the same. `A_std` is `group_size` times larger than
`A`. Only an unconstrained update is a LoRA: `exact` adapters (integer-rounded shifts, trained scales)
are different functions and must be merged instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..merge.adapters import read_adapter
from ..gptq.folders import atomic_output_dir, check_output_dir
from ..gptq import checkpoint as ckpt
from ..gptq.validate import check_checkpoint
from ..names import QALORA, QAVERA


def standard_lora_A(A: torch.Tensor, g_idx: torch.Tensor, factor: int) -> torch.Tensor:
    """(r, n_pool_groups) pooled A -> (r, in) standard LoRA A."""
    return A[:, g_idx.long() // factor].contiguous()  # (r, in)


def export_lora(adapter_dir, out_dir, base_dir, overwrite: bool = False) -> dict:
    """Write `adapter_dir` (QA-LoRA, ours or peft's `use_qalora`) as a plain peft LoRA folder `out_dir`."""
    check_output_dir(Path(out_dir), overwrite, "export-lora", inputs=(adapter_dir, base_dir))
    checkpoint = check_checkpoint(base_dir)  # the base's g_idx decides A's columns: check it first
    config, layers = read_adapter(adapter_dir)
    _check_is_lora(config, layers, adapter_dir)
    reader = ckpt.ShardReader(Path(base_dir), checkpoint)
    tensors, before, after = {}, 0, 0
    for name, layer in sorted(layers.items()):
        if f"{name}.g_idx" not in reader:
            raise ValueError(f"export-lora: the adapter targets {name}, which {base_dir} does not quantize; pass the "
                             "GPTQ base the adapter was trained on.")
        g_idx, n_groups = reader.get(f"{name}.g_idx"), reader.shape(f"{name}.scales")[0]
        factor = layer.pool_factor(g_idx.numel(), n_groups, g_idx, name)  # raises when it cannot be expanded
        A = standard_lora_A(layer.A, g_idx, factor)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.B.contiguous()
        before, after = before + layer.A.numel(), after + A.numel()
    lora_config = _lora_config(config, sorted(layers), base_dir)
    with atomic_output_dir(Path(out_dir), overwrite, "export-lora", inputs=(adapter_dir, base_dir)) as tmp:
        ckpt.write_shard(tmp / "adapter_model.safetensors", tensors)
        (tmp / "adapter_config.json").write_text(json.dumps(lora_config, indent=2, sort_keys=True) + "\n")
    return {"out": str(out_dir), "layers": len(layers), "r": config["r"], "A_parameters_before": before,
            "A_parameters_after": after, "B_parameters": sum(l.B.numel() for l in layers.values())}


def _check_is_lora(config: dict, layers: dict, adapter_dir) -> None:
    if any(layer.magnitude is not None for layer in layers.values()):
        raise ValueError(f"export-lora: {adapter_dir} is a QA-DoRA adapter: its magnitude rescales whole columns, which "
                         "no plain LoRA expresses. Merge it instead: peft-qalora merge ... --format awq.")
    if any(layer.scale_delta is not None for layer in layers.values()):
        raise ValueError(f"export-lora: {adapter_dir} trained the fp16 scales (train_scales), which change every "
                         "weight of the layer: no LoRA expresses that. Merge it instead: peft-qalora merge ... "
                         "--format awq.")
    if config.get("peft_type") in (QALORA, QAVERA) and config.get("merge_strategy") == "exact":
        raise ValueError(f"export-lora: {adapter_dir} was trained with merge_strategy='exact': the model it trained "
                         "rounds every shift to whole quantization steps, which a LoRA cannot reproduce. Merge it "
                         "(peft-qalora merge ... --format awq), or train with --merge-strategy nearest to serve it "
                         "as an adapter.")


def _lora_config(config: dict, modules: list[str], base_dir) -> dict:
    from peft import LoraConfig

    alpha = config.get("lora_alpha", config["r"])  # QA-VeRA has none: its factors carry the scale (alpha / r = 1)
    lora = LoraConfig(r=config["r"], lora_alpha=alpha, lora_dropout=0.0,
                      target_modules=sorted({m.rpartition(".")[2] for m in modules}),
                      use_rslora=bool(config.get("use_rslora")),
                      base_model_name_or_path=str(config.get("base_model_name_or_path") or base_dir))
    out = lora.to_dict()
    out["target_modules"] = sorted(out["target_modules"])  # a set in memory; sorted for a stable file
    return out
