"""Serving latency of a merged QA-LoRA checkpoint against its GPTQ base and the unmerged adapter.

Question: does merging cost anything at inference (it should not: same codes, same scales, only the
zeros moved), and how much does it save over serving the adapter unmerged?

SmolLM2-135M 4-bit g32 GPTQ base; a random non-trivial QA-LoRA adapter (r=16, alpha=32, the 7
projections, init_lora_weights=False) saved and merged with `merge.files.merge_checkpoint`. Three
models in one process, all loaded by `load_gptq_model` (transformers + GPTQModel's gptq_torch kernel,
eager dequantization), eval mode, 2 threads: the GPTQ base, the merged checkpoint, and the base +
adapter through `PeftModel.from_pretrained`. Per model and round: prefill of 256 held-out tokens
(batch 1), then greedy decode with the KV cache, timed per token. The order rotates every round; the
table gives medians. Also the time to dequantize every GPTQ linear once, to show what a CPU forward of
this kernel spends its time on.

    python benchmarks/serving.py [--rounds 3 --new-tokens 16]     # ~5-10 min on 2 cores

Prints a Markdown table, ends with one JSON line; writes results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))
from report import publish  # noqa: E402

import torch  # noqa: E402

import peft_qalora  # noqa: E402
from peft_qalora.assets import cache_dir, shakespeare_dir, smollm2_dir  # noqa: E402
from peft_qalora.base.load import is_gptq_linear, load_gptq_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = ("base", "merged", "adapter")


def gptq_base() -> Path:
    from peft_qalora.base.quantize import QuantizeSettings, quantize_model

    demo = cache_dir() / "demo" / "smollm2-gptq-4b-g32"
    if (demo / "config.json").is_file():
        return demo
    out = cache_dir() / "bench-serving" / "smollm2-gptq-4b-g32"
    if not (out / "config.json").is_file():
        quantize_model(smollm2_dir(), out, QuantizeSettings(bits=4, group_size=32))
    return out


def make_merged(base: Path, work: Path) -> tuple[Path, Path, dict]:
    """A random non-identity adapter on `base`, saved, and merged file to file."""
    from peft import get_peft_model

    from peft_qalora.merge.files import merge_checkpoint

    adapter, merged = work / "adapter", work / "merged"
    torch.manual_seed(0)
    config = peft_qalora.QALoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(load_gptq_model(base), config).save_pretrained(adapter)
    report = merge_checkpoint(base, adapter, merged, overwrite=True, progress=False)
    return adapter, merged, report["total"]


def load_models(base: Path, adapter: Path, merged: Path) -> dict:
    from peft import PeftModel

    return {"base": load_gptq_model(base).eval(), "merged": load_gptq_model(merged).eval(),
            "adapter": PeftModel.from_pretrained(load_gptq_model(base), str(adapter)).eval()}


def prompt(n_tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from peft_qalora.training.data import DataConfig, load_windows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    _, heldout = load_windows(tokenizer, shakespeare_dir(), DataConfig(seq_len=n_tokens, train_windows=1, eval_windows=1))
    return heldout[:1]


@torch.inference_mode()
def generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Prefill seconds, decode seconds per token (KV cache, greedy), and the tokens produced."""
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - start
    past, token, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens.append(int(token))
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"prefill_s": prefill, "decode_s": (time.perf_counter() - start) / new_tokens, "tokens": tokens}


@torch.inference_mode()
def dequant_s(model) -> float:
    """Median seconds to dequantize every GPTQ linear once, as each forward of the torch kernel does."""
    layers = [m for m in model.modules() if is_gptq_linear(m)]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for layer in layers:
            layer.dequantize_weight(num_itr=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(rounds: int, new_tokens: int, prefill_tokens: int) -> dict:
    torch.set_num_threads(2)
    work = cache_dir() / "bench-serving"
    base = gptq_base()
    adapter, merged, merge_total = make_merged(base, work)
    models = load_models(base, adapter, merged)
    ids = prompt(prefill_tokens)
    for model in models.values():  # warm-up: first-call allocations, lazy caches
        generate(model, ids[:, :16], 2)
    runs: dict[str, list] = {name: [] for name in MODELS}
    for r in range(rounds):
        order = MODELS[r % 3:] + MODELS[: r % 3]
        for name in order:
            runs[name].append(generate(models[name], ids, new_tokens))
            print(f"round {r} {name}: prefill {runs[name][-1]['prefill_s']:.3f} s, "
                  f"decode {runs[name][-1]['decode_s']:.3f} s/token", file=sys.stderr)
    return summarize(runs, merge_total, dequant_s(models["base"]), prefill_tokens, new_tokens)


def summarize(runs: dict, merge_total: dict, dequant: float, prefill_tokens: int, new_tokens: int) -> dict:
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("prefill_s", "decode_s")} for n, rs in runs.items()}
    ratio = lambda a, b, k: med[a][k] / med[b][k]  # noqa: E731
    same = sum(a == b for a, b in zip(runs["merged"][0]["tokens"], runs["adapter"][0]["tokens"]))
    return {
        "median": med, "runs": runs, "prefill_tokens": prefill_tokens, "new_tokens": new_tokens,
        "merged_over_base": {k: ratio("merged", "base", k) for k in ("prefill_s", "decode_s")},
        "adapter_over_merged": {k: ratio("adapter", "merged", k) for k in ("prefill_s", "decode_s")},
        "dequant_all_layers_s": dequant, "dequant_share_of_decode": dequant / med["base"]["decode_s"],
        "zeros_moved_fraction": merge_total["moved"] / merge_total["zeros"],
        "greedy_tokens_merged_equal_adapter": f"{same}/{new_tokens}",
    }


def markdown(s: dict) -> str:
    lines = [f"SmolLM2-135M 4-bit g32 GPTQ, gptq_torch kernel (eager dequant), batch 1, 2 threads; prefill "
             f"{s['prefill_tokens']} tokens, greedy decode of {s['new_tokens']} tokens with the KV cache; medians of "
             f"{len(s['runs']['base'])} rotating rounds.", "",
             "| model | prefill s | x base | decode ms/token | x base |", "|---|---|---|---|---|"]
    base = s["median"]["base"]
    labels = {"base": "GPTQ base", "merged": "merged checkpoint", "adapter": "base + unmerged adapter (PeftModel)"}
    for name, m in s["median"].items():
        lines.append(f"| {labels[name]} | {m['prefill_s']:.3f} | {m['prefill_s'] / base['prefill_s']:.2f} | "
                     f"{1e3 * m['decode_s']:.1f} | {m['decode_s'] / base['decode_s']:.2f} |")
    a = s["adapter_over_merged"]
    lines += ["", f"Merging removes the adapter's overhead: unmerged / merged = {a['prefill_s']:.2f} (prefill), "
              f"{a['decode_s']:.2f} (decode). The merge moved {100 * s['zeros_moved_fraction']:.1f}% of the zeros; "
              f"greedy tokens merged vs unmerged equal: {s['greedy_tokens_merged_equal_adapter']}.",
              f"Dequantizing all 210 GPTQ linears once takes {1e3 * s['dequant_all_layers_s']:.0f} ms = "
              f"{100 * s['dequant_share_of_decode']:.0f}% of the median base decode step (timed after the rounds; this "
              "kernel re-dequantizes every weight at every forward, so at batch 1 that is its floor)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    args = parser.parse_args()
    summary = run(args.rounds, args.new_tokens, args.prefill_tokens)
    text = markdown(summary)
    publish("serving", summary, text)


if __name__ == "__main__":
    main()
