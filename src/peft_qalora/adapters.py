"""Reading adapter folders (ours, or peft's `LoraConfig(use_qalora=True)`) as per-layer updates.

Both become `LayerAdapter`: A (r, n_pool_groups) and B (out, r) in the group-SUM convention, the
scaling, and the pooling group size in inputs. peft's own QA-LoRA pools with `mean * n_chunks`
over contiguous chunks of `qalora_group_size`, i.e. `sum * n_chunks / qalora_group_size`: importing
it multiplies A by that factor, and it merges only when its chunks are whole quantization groups.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .merge import check_finite, group_delta


@dataclass
class LayerAdapter:
    """One layer's adapter in our convention."""

    A: torch.Tensor  # (r, n_pool_groups)
    B: torch.Tensor  # (out, r)
    scaling: float
    pool_group_size: int | None  # inputs per pooling group; None = the layer's quantization group size
    contiguous_chunks: bool = False  # peft's pooling: contiguous input chunks, blind to g_idx
    scale_delta: torch.Tensor | None = None  # (n_quant_groups, out) trained c in s' = s * (1 + c)

    def delta(self, in_features: int, n_quant_groups: int, g_idx: torch.Tensor, name: str) -> torch.Tensor:
        """(n_quant_groups, out) weight update of every quantization group; raises if it cannot merge."""
        return group_delta(self.A, self.B, self.scaling, self.pool_factor(in_features, n_quant_groups, g_idx, name))

    def pool_factor(self, in_features: int, n_quant_groups: int, g_idx: torch.Tensor, name: str) -> int:
        """Quantization groups per pooling group; raises when the update is not constant per group."""
        quant_gs = in_features // n_quant_groups
        pool_gs = self.pool_group_size or quant_gs
        if pool_gs % quant_gs or self.A.shape[1] * pool_gs != in_features:
            raise ValueError(
                f"merge: the adapter of {name} pools groups of {pool_gs} inputs ({self.A.shape[1]} groups) but the "
                f"base layer has {in_features} inputs quantized in groups of {quant_gs}: the update is not constant "
                "per quantization group, so it cannot become zero points. Merge it into the base it was trained on."
            )
        if self.contiguous_chunks and not torch.equal(g_idx.long(), torch.arange(in_features) // quant_gs):
            raise ValueError(
                f"merge: {name} is act-order (scattered groups) but peft's use_qalora pooled contiguous chunks, which "
                "straddle its quantization groups; this adapter cannot merge. Train with peft_qalora.QALoraConfig, "
                "which pools by g_idx."
            )
        return pool_gs // quant_gs


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, LayerAdapter]]:
    """Adapter config and per-module adapters keyed by the base model's module names."""
    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"adapters: {folder} needs adapter_config.json and adapter_model.safetensors (what save_pretrained writes)."
        )
    config = json.loads(config_file.read_text())
    tensors = load_file(str(weights_file))
    for key, value in tensors.items():
        check_finite(value, f"adapter tensor {key}")
    kind = config.get("peft_type")
    if kind == "QALORA":
        layers = _layers(tensors, "qalora_A", "qalora_B", config, config.get("group_size"), 1.0, False)
        ratio = float(config.get("scale_lr_ratio", 1.0))  # the file holds c / scale_lr_ratio
        for key, value in tensors.items():
            if ".qalora_scale" in key:
                layers[key.split(".qalora_scale")[0].removeprefix("base_model.model.")].scale_delta = value.float() * ratio
        return config, layers
    if kind == "LORA" and config.get("use_qalora"):
        return config, _peft_qalora_layers(tensors, config)
    raise ValueError(
        f"adapters: {folder} holds a {kind} adapter{' without use_qalora' if kind == 'LORA' else ''}; only QA-LoRA "
        "adapters (peft_qalora.QALoraConfig, or peft LoraConfig(use_qalora=True)) can merge into GPTQ zero points."
    )


def _scaling(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _layers(tensors, a_name, b_name, config, pool_gs, a_factor, contiguous) -> dict[str, LayerAdapter]:
    layers = {}
    for key in tensors:
        if f".{a_name}." not in key:
            continue
        module = key.split(f".{a_name}.")[0].removeprefix("base_model.model.")
        A = tensors[key].float()
        B = tensors[key.replace(f".{a_name}.", f".{b_name}.")].float()
        layers[module] = LayerAdapter(A * a_factor(A) if callable(a_factor) else A * a_factor, B, _scaling(config),
                                      pool_gs, contiguous)
    if not layers:
        raise ValueError(f"adapters: no {a_name} tensors in the adapter file; is it a complete adapter?")
    return layers


def _peft_qalora_layers(tensors: dict, config: dict) -> dict[str, LayerAdapter]:
    chunk = int(config.get("qalora_group_size", 16))
    if config.get("use_dora") or config.get("lora_bias"):
        raise ValueError("adapters: peft use_qalora adapters with DoRA or a LoRA bias cannot merge into zero points.")
    # peft: delta = scaling * B A (mean-pool * n_chunks) = scaling * B (A * n_chunks / chunk) (sum-pool)
    return _layers(tensors, "lora_A", "lora_B", config, chunk, lambda A: A.shape[1] / chunk, True)
