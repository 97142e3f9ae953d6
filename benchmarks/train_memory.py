"""Memory per weight and step time of a training step, code cache on, off and on a budget, on a 7B-shaped slice.

Question: how many bytes a weight does training hold with the int8 `q - z` code cache (kernels.LayerCache)
and without it (codes unpacked at every forward and backward into one reused buffer), and what does the
unpacking cost in step time?

Model: a LLaMA with 2 decoder layers at 7B widths (hidden 4096, intermediate 11008, 32 heads), vocab 256,
every decoder linear a 4-bit g128 GPTQ layer with RANDOM codes, zeros and scales (the kernel's work does
not depend on the values), loaded with peft_qalora.load_gptq_model (gptq_torch). 404.8M quantized weights.
Adapters r=16 on the 7 projections; kinds: "plain" (merge_strategy="nearest") and "scales" (the default:
exact + trained scales). Batch 1 x 128 tokens, AdamW, no gradient checkpointing, 2 threads.

Settings (PEFT_QALORA_CODE_CACHE in each child): all (today's default), none, and a budget of half the
full cache. Every (kind, setting) runs in its own subprocess (so freed memory of one cannot hide in the
next one's RSS), rounds alternating all, none, budget, ... The machine may be shared: read the ratios,
measured side by side in one run, not the absolute seconds.

Measured per child, after the steps: tensor bytes held for the quantized weights (qweight, qzeros,
scales, g_idx), the code cache (kernels.code_cache_bytes), the layer caches' small tensors (float32
scales, zeros, act-order permutation), the kernel's per-process scratch buffers, the adapter (parameters,
gradients, AdamW's 2 states); and RSS: the peak during the timed steps and the RSS after them, minus the
RSS after importing the libraries (before the model): the model and its training state.

    python benchmarks/train_memory.py [--rounds 2 --warmup 1 --steps 2 --kinds plain,scales]   # ~10 min, 2 cores

Prints a Markdown table, ends with one JSON line; writes results/train_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
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

SHAPE = dict(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=256, tie_word_embeddings=False)
BITS, GROUP = 4, 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {"plain": dict(merge_strategy="nearest"), "scales": dict(merge_strategy="exact", train_scales=True)}


def n_weights() -> int:
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    return SHAPE["num_hidden_layers"] * (4 * h * h + 3 * h * i)


def slice_folder() -> Path:
    """A GPTQ checkpoint of the slice with random codes, written once into the project cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_qalora.assets import cache_dir
    from peft_qalora.gptq import checkpoint as ckpt
    from peft_qalora.gptq.packing import pack_rows
    from peft_qalora.gptq.tensors import encode_zeros

    folder = cache_dir() / "bench-train-memory" / "llama7b-shaped-2layers-gptq-4b-g128"
    if (folder / "config.json").is_file():
        return folder
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            out_f, in_f = module.weight.shape
            codes = torch.randint(0, 1 << BITS, (in_f, out_f), generator=gen, dtype=torch.int32)
            zeros = torch.randint(1, (1 << BITS), (in_f // GROUP, out_f), generator=gen, dtype=torch.int32)
            tensors.update({f"{name}.qweight": pack_rows(codes, BITS), f"{name}.qzeros": encode_zeros(zeros, BITS),
                            f"{name}.scales": (torch.rand(in_f // GROUP, out_f, generator=gen) * 2e-3 + 1e-3).half(),
                            f"{name}.g_idx": (torch.arange(in_f) // GROUP).to(torch.int32)})
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] + ".qweight" not in tensors:
            tensors[key] = (torch.ones(value.shape) if "norm" in key else torch.randn(value.shape, generator=gen) * 0.02).half()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_shard(folder / "model.safetensors", tensors)
    quant = ckpt.output_quant_config({"bits": BITS, "group_size": GROUP, "desc_act": False})
    config = model.config.to_dict()
    config["dtype"] = "float16"
    ckpt.write_configs(folder, config, quant)
    return folder


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tensor_bytes(model, optimizer) -> dict:
    """Bytes of the tensors the training state holds, by kind (each storage counted once)."""
    from peft_qalora.tuners import kernels
    from peft_qalora.tuners.qalora.layer import QALoraLinear

    def total(tensors):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None
                    and t.numel()}.values())

    layers = [m for m in model.modules() if isinstance(m, QALoraLinear)]
    bases = [m.get_base_layer() for m in layers]
    small = [t for m in layers for t in (m.cache.scales, m.cache.zeros, m.cache.order)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    pool = kernels._buffers.__dict__.get("pool", {})
    return {"weights": total([getattr(b, k) for b in bases for k in ("qweight", "qzeros", "scales", "g_idx")]),
            "code_cache": kernels.code_cache_bytes(),
            "layer_small": total(small),
            "scratch": total(list(pool.values())),
            "adapter": total(trainable) + total([p.grad for p in trainable]) + total(states),
            "adapter_params": sum(p.numel() for p in trainable)}


def child(kind: str, warmup: int, steps: int) -> dict:
    torch.set_num_threads(2)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peft_qalora
    from peft import get_peft_model
    from peft_qalora.tuners import kernels

    folder = slice_folder()
    rss_libs = rss_mb("VmRSS")
    model = peft_qalora.prepare_model_for_training(peft_qalora.load_gptq_model(folder), gradient_checkpointing=False)
    model = get_peft_model(model, peft_qalora.QALoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, **KINDS[kind]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, SHAPE["vocab_size"], (1, 128), generator=gen) for _ in range(warmup + steps)]
    rss_load = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the steps alone
    times, losses = [], []
    for i, batch in enumerate(data):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: what a step holds
        losses.append(float(loss))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"kind": kind, "setting": kernels.code_cache(), "step_times": times, "losses": losses,
            "bytes": tensor_bytes(model, optimizer), "rss_libraries_mb": rss_libs, "rss_after_load_mb": rss_load,
            "train_peak_mb": rss_mb("VmHWM"), "rss_after_steps_mb": rss_mb("VmRSS")}


def run_child(kind: str, setting: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = dict(os.environ, PEFT_QALORA_CODE_CACHE=setting)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{kind}/{setting} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--kinds", default="plain,scales")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.warmup, args.steps)))
        return
    slice_folder()
    n = n_weights()
    budget = f"{n // 2}B"  # half of the full int8 cache
    settings = {"all": "all", "none": "none", "budget": budget}
    kinds = args.kinds.split(",")
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for kind in kinds:
            for label, setting in settings.items():
                result = run_child(kind, setting, args)
                runs.setdefault(f"{kind}/{label}", []).append(result)
                print(f"round {r} {kind}/{label}: {[round(t, 2) for t in result['step_times']]} s, "
                      f"peak {result['train_peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    rows, summary = [], {}
    for key, rs in runs.items():
        kind, label = key.split("/")
        b = rs[0]["bytes"]
        step_s = statistics.median(t for r in rs for t in r["step_times"])
        peak = max(r["train_peak_mb"] - r["rss_libraries_mb"] for r in rs) * 2**20
        after = statistics.median(r["rss_after_steps_mb"] - r["rss_libraries_mb"] for r in rs) * 2**20
        resident = b["weights"] + b["code_cache"] + b["layer_small"]
        summary[key] = {"step_s": step_s, "round_step_s": [statistics.median(r["step_times"]) for r in rs],
                        "bytes": b, "resident_weight_bytes_per_weight": resident / n,
                        "weights_per_weight": b["weights"] / n, "code_cache_per_weight": b["code_cache"] / n,
                        "layer_small_per_weight": b["layer_small"] / n, "scratch_mb": b["scratch"] / 2**20,
                        "adapter_mb": b["adapter"] / 2**20, "rss_peak_per_weight": peak / n,
                        "rss_after_steps_per_weight": after / n, "first_loss": rs[0]["losses"][0]}
    for key, s in summary.items():
        kind = key.split("/")[0]
        ref = summary[f"{kind}/all"]
        s["step_over_all"] = s["step_s"] / ref["step_s"]
        s["rss_peak_saved_per_weight"] = ref["rss_peak_per_weight"] - s["rss_peak_per_weight"]
        rows.append(f"| {key} | {s['step_s']:.2f} | {s['step_over_all']:.3f} | {s['weights_per_weight']:.3f} | "
                    f"{s['code_cache_per_weight']:.3f} | {s['layer_small_per_weight']:.3f} | "
                    f"**{s['resident_weight_bytes_per_weight']:.3f}** | {s['scratch_mb']:.0f} | {s['adapter_mb']:.0f} | "
                    f"{s['rss_peak_per_weight']:.2f} | {s['rss_after_steps_per_weight']:.2f} | "
                    f"{s['rss_peak_saved_per_weight']:+.2f} |")
    table = (f"Training step on a 7B-shaped slice (2 LLaMA decoder layers, hidden 4096, intermediate 11008; "
             f"{n / 1e6:.1f}M 4-bit g128 weights, random codes), r=16 on 7 projections, batch 1 x 128, AdamW, "
             f"no checkpointing; {args.rounds} alternating rounds x {args.steps} timed steps after {args.warmup} warm-up, "
             f"each (kind, setting) in its own process; budget = {budget} (half the full cache).\n\n"
             "| kind/setting | s/step | x all | packed B/w | code cache B/w | layer cache small B/w | **weights resident B/w** "
             "| scratch MB (per process) | adapter + grads + AdamW MB | RSS peak B/w | RSS after B/w | RSS peak saved B/w |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
             "B/w = bytes per quantized weight. RSS = the process's resident memory minus its RSS after importing the "
             "libraries (so it includes the fp16 embeddings and lm_head, activations and allocator slack); "
             "the per-process scratch (dequantized weight, fp16 rounding, unpacked levels) does not grow with the model.\n")
    out = {"n_weights": n, "budget": budget, "kinds": kinds, "rounds": args.rounds, "steps": args.steps,
           "summary": summary,
           "ratios": {f"{k}_step_over_all": v["step_over_all"] for k, v in summary.items()},
           "runs": runs}
    publish("train_memory", out, table)


if __name__ == "__main__":
    main()
