"""Trainable parameters and AdamW memory per mode, for SmolLM2-135M (checked against the counts the quality
benchmark measured on the real model) and for LLaMA-7B and LLaMA-2-70B shapes (computed).

    python benchmarks/params_table.py     # writes results/params.json and results/params.md

Per adapted linear with `in` inputs, `out` outputs, `G = in / group_size` quantization groups, rank r:
QA-LoRA A and B: r * (G + out) (A acts on the pooled input); trained scales: G * out; QA-DoRA's magnitude: out;
QA-VeRA: d (r) and b (out), its shared frozen projections are buffers. Memory of a trainable fp32 parameter with
AdamW: 4 (parameter) + 4 (gradient) + 8 (two moments) = 16 bytes; sharded over N processes it is 16 / N.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def llama_linears(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int) -> list[tuple[int, int]]:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    per_layer = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                 (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return per_layer * layers


MODELS = {
    "SmolLM2-135M (g32)": (llama_linears(576, 1536, 9, 3, 30), 32),
    "LLaMA-7B (g128)": (llama_linears(4096, 11008, 32, 32, 32), 128),
    "LLaMA-7B (g32)": (llama_linears(4096, 11008, 32, 32, 32), 32),
    "LLaMA-2-70B (g128)": (llama_linears(8192, 28672, 64, 8, 80), 128),
}
MODES = {  # trainable parameters of one linear
    "qalora": lambda i, o, G, r: r * (G + o),  # also "exact" (same parameters, integer shifts)
    "exact_scales": lambda i, o, G, r: r * (G + o) + G * o,
    "scales_only": lambda i, o, G, r: G * o,
    "dora": lambda i, o, G, r: r * (G + o) + o,
    "vera": lambda i, o, G, r: VERA_R + o,  # at VeRA's own rank (peft's default), as the quality benchmark trains it
}
VERA_R = 256
BYTES_PER_TRAINABLE = 16  # fp32 parameter + gradient + AdamW's two moments


def table(r: int = 16) -> dict:
    out = {}
    for model, (linears, group) in MODELS.items():
        out[model] = {"weights": sum(i * o for i, o in linears)}
        for mode, count in MODES.items():
            n = sum(count(i, o, i // group, r) for i, o in linears)
            out[model][mode] = {"trainable": n, "adamw_gb": n * BYTES_PER_TRAINABLE / 1e9,
                                "adamw_gb_sharded_8": n * BYTES_PER_TRAINABLE / 8 / 1e9}
    return out


def check_against_measured(result: dict) -> dict:
    """The SmolLM2 formula against the trainable counts the quality benchmark measured on the model."""
    checked = {}
    for path in sorted((ROOT / "results").glob("quality*.json")):
        for row in (v for k, v in json.loads(path.read_text()).items() if k.isdigit()):
            for mode in MODES:
                key = f"trainable_{'qalora' if mode == 'qalora' else mode}"
                if key in row:
                    want = result["SmolLM2-135M (g32)"][mode]["trainable"]
                    if row[key] != want:
                        raise AssertionError(f"{path.name}: measured {row[key]} trainable for {mode}, formula {want}")
                    checked[mode] = row[key]
    return checked


def markdown(result: dict, checked: dict) -> str:
    models = list(result)
    lines = ["Trainable parameters and AdamW memory (fp32 parameter + gradient + 2 moments = 16 bytes each), r=16, "
             "every linear of the model adapted (QA-VeRA at r=256: its count does not grow with r beyond r + out a layer). "
             "`exact` has the parameters of `qalora`.", "",
             "| mode | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for mode in MODES:
        cells = []
        for m in models:
            v = result[m][mode]
            cells.append(f"{v['trainable'] / 1e6:,.2f}M / {v['adamw_gb']:.3g} GB")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Sharded over 8 processes (`--shard-optimizer`), each holds 1/8 of that: e.g. LLaMA-2-70B "
              f"exact_scales {result['LLaMA-2-70B (g128)']['exact_scales']['adamw_gb_sharded_8']:.2f} GB per GPU.",
              "", "SmolLM2 counts checked against the model's own trainable parameters (quality benchmark): "
              + (", ".join(f"{k} {v:,}" for k, v in checked.items()) or "none measured yet") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    result = table()
    checked = check_against_measured(result)
    (ROOT / "results" / "params.json").write_text(json.dumps({"table": result, "checked": checked}, indent=2) + "\n")
    text = markdown(result, checked)
    (ROOT / "results" / "params.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
