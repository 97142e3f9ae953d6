"""The paper's Table 1 on SmolLM2-135M: held-out perplexity of every way to fine-tune and ship.

    python benchmarks/quality.py            # 4, 3, 2 bits, 30 steps (results/quality.*); ~60 min on 2 cores
    python benchmarks/quality.py --quick    # 4 bits, a few steps: checks the pipeline in minutes

Same token budget and hyper-parameters for every method (r=16, alpha=32, AdamW, constant lr 2e-4,
all linear layers, batch 4 x 128 tokens); the scale factors that only "exact + scales" has move 10x
faster than A and B (QALoraConfig.scale_lr_ratio's default). Every merged number comes from the exported checkpoint loaded
by transformers + GPTQModel, never from an in-memory simulation. Writes results/quality.json,
results/quality.md and results/quality.png; prints the table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from peft_qalora.assets import MILTON_HELDOUT, cache_dir, milton_dir, shakespeare_dir, smollm2_dir  # noqa: E402
from peft_qalora.merge.calibrate import calibrate  # noqa: E402
from peft_qalora.training.data import DataConfig, lm_dataset, load_windows  # noqa: E402
from peft_qalora.evaluate import perplexity  # noqa: E402
from peft_qalora.merge.files import merge_checkpoint  # noqa: E402
from peft_qalora.base.quantize import QuantizeSettings, quantize_model  # noqa: E402
from peft_qalora.base.load import load_gptq_model  # noqa: E402
from peft_qalora.training.recipe import TrainSettings, train_adapter  # noqa: E402


@dataclass
class Budget:
    steps: int = 30  # the committed results/quality.*; --steps 150 for the architecture note's budget
    eval_windows: int = 24
    bits: list[int] = field(default_factory=lambda: [4, 3, 2])
    lr: float = 2e-4
    calib_windows: int = 64
    skip: list[str] = field(default_factory=list)
    domain: str = "shakespeare"  # or "milton": trained on three of Milton's works, held out: Paradise Regained
    modes: list[str] | None = None  # exact-merge modes to run (MODES keys); None = all
    unconstrained: bool = True  # the unconstrained adapter's rows (unmerged, nearest, calibrated)


# Every exact-merge mode: the merged checkpoint equals the trained model. Same token budget and learning rate.
MODES = {
    "exact": dict(merge_strategy="exact", train_scales=False),  # the adapter alone, integer shifts
    "exact_scales": dict(merge_strategy="exact", train_scales=True),  # adapter + trained scales (the old default)
    "scales_only": dict(scales_only=True),  # the trained scales alone: the control (PEQA)
    "dora": dict(merge_strategy="exact", use_dora=True),  # QA-DoRA: adapter + a magnitude per column
    # QA-VeRA: frozen shared projections, d and b per layer; r=256 and lr 2e-3 (VeRA's own regime: its vectors
    # scale whole random directions, and at 2e-4 they barely move), the same for peft's float VeRA reference
    "vera": dict(method="vera", merge_strategy="exact", r=256, learning_rate=2e-3),
    "vera_nearest": dict(method="vera", merge_strategy="nearest", r=256, learning_rate=2e-3),  # unconstrained VeRA
    # where the adapter might add to the scales: A and B at 10x the rate (scales at their usual 10x of 2e-4), rank 64
    "exact_scales_lr10": dict(merge_strategy="exact", train_scales=True, learning_rate=2e-3, scale_lr_ratio=1.0),
    "exact_scales_r64": dict(merge_strategy="exact", train_scales=True, r=64, lora_alpha=128),
}


def train_plain_lora(model, windows, out_dir, budget: Budget, kind: str = "lora") -> dict:
    """peft LoRA (or its DoRA / VeRA) with the same settings as QA-LoRA (float or NF4 base): 16-bit references."""
    from peft import LoraConfig, VeraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    lr = budget.lr
    if kind == "vera":
        config, lr = VeraConfig(r=256, target_modules="all-linear"), MODES["vera"]["learning_rate"]
    else:
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=kind == "dora")
    model = get_peft_model(model, config)
    args = TrainingArguments(str(out_dir / "trainer"), max_steps=budget.steps, per_device_train_batch_size=4,
                             learning_rate=lr, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, logging_steps=50)
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=lm_dataset(windows)).train()
    model.save_pretrained(out_dir)
    return {"model": model, "seconds": time.perf_counter() - start}


def float_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def nf4_model(path):
    """SmolLM2 with every linear NF4-quantized by bitsandbytes (double quantization), then stored as the
    dequantized float weights. bitsandbytes' Linear4bit dequantizes and multiplies the same way, so this is
    the QLoRA base to float rounding; on a CPU it trains ~20x faster than bitsandbytes' 4-bit path."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = weight
            if module.bias is not None:
                dense.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    model.hf_quantizer, model.is_loaded_in_4bit, model.is_quantized = None, False, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def gptq_base(src, work: Path, name: str, bits: int, calib_windows: int) -> Path:
    demo = cache_dir() / "demo" / f"smollm2-gptq-{bits}b-g32"  # `make demo` quantizes with the same settings
    if name.startswith("gptq-") and calib_windows == QuantizeSettings.calibration_windows and demo.is_dir():
        return demo
    out = work / name
    if not out.is_dir():
        quantize_model(src, out, QuantizeSettings(bits=bits, group_size=32, calibration_windows=calib_windows))
    return out


def qalora_rows(base: Path, bits: int, train, heldout, work: Path, budget: Budget, results: dict,
                results_path: Path) -> None:
    """QA-LoRA unmerged, merged nearest and calibrated; exact; exact with trained scales."""
    row = results.setdefault(f"{bits}", {})
    row["gptq_base"] = perplexity(load_gptq_model(base), heldout)
    for label, settings in MODES.items():
        if label in budget.skip or (budget.modes is not None and label not in budget.modes):
            continue
        adapter = work / f"{label}-{bits}b"
        shutil.rmtree(adapter, ignore_errors=True)
        fields = dict(steps=budget.steps, learning_rate=budget.lr, scales_only=False) | settings
        trained = train_adapter(base, train, adapter, TrainSettings(**fields))
        row[f"{label}_trained"] = perplexity(trained["model"].eval(), heldout)
        row[f"trainable_{label}"] = sum(p.numel() for p in trained["model"].parameters() if p.requires_grad)
        out = work / f"merged-{bits}b-{label}"
        merge_checkpoint(base, adapter, out, overwrite=True)
        row[f"{label}_merged"] = perplexity(load_gptq_model(out), heldout)
        row[f"seconds_per_step_{label}"] = trained["seconds_per_step"]
        save(results, results_path)
    if budget.unconstrained:
        unconstrained_rows(base, bits, train, heldout, work, budget, row)


def unconstrained_rows(base: Path, bits: int, train, heldout, work: Path, budget: Budget, row: dict) -> None:
    """The unconstrained QA-LoRA adapter: unmerged, merged with nearest and with calibrated rounding."""
    adapter = work / f"qalora-{bits}b"
    shutil.rmtree(adapter, ignore_errors=True)
    unconstrained = TrainSettings(steps=budget.steps, learning_rate=budget.lr, merge_strategy="nearest")
    trained = train_adapter(base, train, adapter, unconstrained)
    model = trained["model"].eval()
    row["qalora_unmerged"] = perplexity(model, heldout)
    row["trainable_qalora"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["seconds_per_step_qalora"] = trained["seconds_per_step"]
    hessians = calibrate(model, train[: budget.calib_windows])
    for strategy in ("nearest", "calibrated"):
        out = work / f"merged-{bits}b-{strategy}"
        report = merge_checkpoint(base, adapter, out, strategy=strategy, overwrite=True, hessians=hessians)
        row[f"qalora_merged_{strategy}"] = perplexity(load_gptq_model(out), heldout)
        row[f"moved_{strategy}"] = report["total"]["moved"] / report["total"]["zeros"]


def qlora_with_gptq(src, qlora_adapter: Path, bits: int, work: Path, heldout, budget: Budget) -> float:
    """The paper's baseline: QLoRA adapter merged into the float model, then GPTQ-quantized."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    merged_float = work / "float-plus-qlora"
    if not merged_float.is_dir():
        model = PeftModel.from_pretrained(float_model(smollm2_dir()), str(qlora_adapter)).merge_and_unload()
        model.save_pretrained(merged_float)
        AutoTokenizer.from_pretrained(src).save_pretrained(merged_float)
    base = gptq_base(merged_float, work, f"qlora-gptq-{bits}b", bits, budget.calib_windows)
    return perplexity(load_gptq_model(base), heldout)


def run(budget: Budget, work: Path, part: str = "all", out: Path | None = None, add: bool = False) -> dict:
    """`part`: "all", "qalora" (the QA-LoRA rows), "baselines" (float, LoRA, QLoRA, QLoRA w/ GPTQ) or "references"
    (peft's DoRA and VeRA on the float model), so parts can run side by side and be joined with --join. `add`
    keeps the rows already in `out` (same budget) and adds or replaces the ones this run makes."""
    from transformers import AutoTokenizer

    src = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(src)
    data = DataConfig(seq_len=128, train_windows=budget.steps * 4, eval_windows=budget.eval_windows)
    if budget.domain == "milton":
        data.heldout = MILTON_HELDOUT
    train, heldout = load_windows(tokenizer, milton_dir() if budget.domain == "milton" else shakespeare_dir(), data)
    out = out or ROOT / "results" / ("quality.json" if part == "all" else f"quality-{part}.json")
    results: dict = {"budget": asdict(budget), "float": {}}
    if add and out.is_file():
        results = join([out])
        results["budget"] = {**results["budget"], "modes": None, "unconstrained": True}  # the union of the runs
    if part == "references":
        for kind in ("dora", "vera"):
            trained = train_plain_lora(float_model(src), train, work / f"{kind}-float", budget, kind)
            results["float"][f"float_{kind}"] = perplexity(trained["model"].eval(), heldout)
            save(results, out)
        return results
    if part in ("all", "qalora"):
        for bits in budget.bits:  # QA-LoRA rows first: a stopped run keeps what matters most
            qalora_rows(gptq_base(src, work.parent, f"gptq-{bits}b", bits, budget.calib_windows), bits, train, heldout,
                        work, budget, results, out)
            save(results, out)
    if part in ("all", "baselines"):
        results["float"]["float"] = perplexity(float_model(src), heldout)
        lora = train_plain_lora(float_model(src), train, work / "lora-float", budget)
        results["float"]["float_lora"] = perplexity(lora["model"].eval(), heldout)
        for stale in [work / "float-plus-qlora", *work.glob("qlora-gptq-*")]:  # built from this run's adapter
            shutil.rmtree(stale, ignore_errors=True)
        qlora = train_plain_lora(nf4_model(src), train, work / "qlora-nf4", budget)
        results["float"]["qlora_nf4_unmerged"] = perplexity(qlora["model"].eval(), heldout)
        for bits in budget.bits:
            results.setdefault(f"{bits}", {})["qlora_w_gptq"] = qlora_with_gptq(src, work / "qlora-nf4", bits, work,
                                                                                  heldout, budget)
            save(results, out)
    return results


def join(paths: list[Path]) -> dict:
    """Merge the JSON of a "qalora" run and a "baselines" run into one result."""
    results: dict = {}
    for path in paths:
        for key, value in json.loads(path.read_text()).items():
            results.setdefault(key, {}).update(value) if isinstance(value, dict) else results.update({key: value})
    return results


ROWS = [
    ("gptq_base", "GPTQ base (no fine-tuning)"),
    ("qlora_w_gptq", "QLoRA w/ GPTQ (adapter merged into float, re-quantized)"),
    ("qalora_unmerged", "QA-LoRA, unmerged adapter"),
    ("qalora_merged_nearest", "QA-LoRA merged, nearest"),
    ("qalora_merged_calibrated", "QA-LoRA merged, calibrated"),
    ("exact_trained", "QA-LoRA exact, trained model"),
    ("exact_merged", "QA-LoRA exact, merged checkpoint"),
    ("exact_scales_trained", "QA-LoRA exact + scales, trained model"),
    ("exact_scales_merged", "QA-LoRA exact + scales, merged checkpoint"),
    ("scales_only_trained", "scales only (no adapter), trained model"),
    ("scales_only_merged", "scales only (no adapter), merged checkpoint"),
    ("dora_trained", "QA-DoRA exact, trained model"),
    ("dora_merged", "QA-DoRA exact, merged checkpoint"),
    ("vera_trained", "QA-VeRA exact, trained model"),
    ("vera_merged", "QA-VeRA exact, merged checkpoint"),
    ("vera_nearest_trained", "QA-VeRA unconstrained, unmerged adapter"),
    ("vera_nearest_merged", "QA-VeRA unconstrained, merged nearest"),
    ("exact_scales_lr10_merged", "exact + scales, A and B at 10x lr, merged checkpoint"),
    ("exact_scales_r64_merged", "exact + scales, r=64, merged checkpoint"),
]
EARLIER_ROWS = ("qlora_w_gptq", "qalora_unmerged", "qalora_merged_nearest", "qalora_merged_calibrated", "exact_trained",
                "exact_merged")  # rows kept from a run on another quantization of the base, when `gptq_base_earlier` says so
MERGED = ("qalora_merged_nearest", "qalora_merged_calibrated", "exact_merged", "exact_scales_merged",
          "scales_only_merged", "dora_merged", "vera_merged", "vera_nearest_merged", "exact_scales_lr10_merged",
          "exact_scales_r64_merged")
TRAINABLE = ("qalora", "exact", "exact_scales", "scales_only", "dora", "vera", "exact_scales_r64")


def markdown(results: dict) -> str:
    bits = [b for b in ("4", "3", "2") if b in results]
    f = results["float"]
    bits = [b for b in bits if "gptq_base" in results[b]]
    domain = results["budget"].get("domain", "shakespeare")
    text = "Milton (held out: Paradise Regained)" if domain == "milton" else "Shakespeare (held out: 3 plays)"
    lines = [f"Held-out perplexity, SmolLM2-135M, {text}, group 32, {results['budget']['steps']} steps of batch "
             f"4 x 128, {results['budget']['eval_windows']} x 128 held-out tokens (lower is better).", "",
             f"float model {f.get('float', float('nan')):.2f}; float + LoRA {f.get('float_lora', float('nan')):.2f}; "
             f"QLoRA (NF4 + LoRA, unmerged, \"4+16\") {f.get('qlora_nf4_unmerged', float('nan')):.2f}; "
             f"float + DoRA {f.get('float_dora', float('nan')):.2f}; float + VeRA {f.get('float_vera', float('nan')):.2f}",
             "",
             "| method | " + " | ".join(f"{b}-bit" for b in bits) + " |", "|---|" + "---|" * len(bits)]
    earlier = [results[b]["gptq_base_earlier"] for b in bits if "gptq_base_earlier" in results[b]]
    for key, label in ROWS:
        cells = [f"{results[b][key]:.2f}" if key in results[b] else "-" for b in bits]
        mark = " †" if earlier and key in EARLIER_ROWS else ""
        if any(c != "-" for c in cells):
            lines.append(f"| {label}{mark} | " + " | ".join(cells) + " |")
    if earlier:
        lines += ["", "† measured on an earlier GPTQ quantization of the same model (GPTQModel is not bit-reproducible "
                  "from run to run): its base scored " + " / ".join(f"{v:.2f}" for v in earlier) + "; compare "
                  "these rows with each other, and the unmarked rows with each other."]
    lines += ["", "Trainable parameters (SmolLM2-135M, r=16, all linear layers, group 32):", "",
              "| mode | " + " | ".join(f"{b}-bit" for b in bits) + " |", "|---|" + "---|" * len(bits)]
    for mode in TRAINABLE:
        cells = [f"{results[b][f'trainable_{mode}'] / 1e6:.2f}M" if f"trainable_{mode}" in results[b] else "-"
                 for b in bits]
        if any(c != "-" for c in cells):
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Share of the unconstrained adapter's gain (base - fine-tuned) kept by each merged checkpoint:", "",
              "| merged checkpoint | " + " | ".join(f"{b}-bit" for b in bits) + " |", "|---|" + "---|" * len(bits)]
    for key in MERGED:
        cells = []
        for b in bits:
            r = results[b]
            base = r.get("gptq_base_earlier", r["gptq_base"]) if key in EARLIER_ROWS else r["gptq_base"]
            gain = r.get("gptq_base_earlier", r["gptq_base"]) - r["qalora_unmerged"] if "qalora_unmerged" in r else None
            if gain and key not in EARLIER_ROWS and "gptq_base_earlier" in r:
                gain = None  # the unconstrained adapter was trained on the other quantization
            cells.append(f"{round(100 * (base - r[key]) / gain)}%" if key in r and gain else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Exported (reloaded by transformers + GPTQModel) against trained, to 4 significant digits:", ""]
    lines += [target_line(b, results[b]) for b in bits]
    return "\n".join(lines) + "\n"


def target_line(bits: str, r: dict) -> str:
    """One bit width: every exact mode's exported checkpoint against its trained model, and the earlier targets
    where the unconstrained adapter was run."""
    parts = [f"- {bits}-bit:"]
    for mode in MODES:
        exact = MODES[mode].get("merge_strategy", "exact") == "exact"  # only exact modes promise exported == trained
        if exact and f"{mode}_merged" in r and f"{mode}_trained" in r:
            trained, merged = r[f"{mode}_trained"], r[f"{mode}_merged"]
            same = "equal" if f"{trained:.4g}" == f"{merged:.4g}" else "NOT equal"
            parts.append(f"{mode} exported {merged:.4g} vs trained {trained:.4g} ({same});")
    if "qalora_merged_calibrated" in r and "qalora_unmerged" in r:
        closed = (r["qalora_merged_nearest"] - r["qalora_merged_calibrated"]) / (r["qalora_merged_nearest"] - r["qalora_unmerged"])
        parts.append(f"calibrated closes {100 * closed:.0f}% of the gap nearest leaves (target 80%);")
    merged_keys = [k for k in MERGED if k in r]
    if merged_keys and "qlora_w_gptq" in r:
        best = min(r[k] for k in merged_keys)
        verdict = "beats" if best < r["qlora_w_gptq"] else "does NOT beat"
        parts.append(f"best merged checkpoint {best:.2f} {verdict} QLoRA w/ GPTQ {r['qlora_w_gptq']:.2f}.")
    return " ".join(parts)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [b for b in ("4", "3", "2") if b in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in ROWS:
        xs = [int(b) for b in bits if key in results[b]]
        ax.plot(xs, [results[str(b)][key] for b in xs], marker="o", label=label)
    ax.axhline(results["float"].get("float_lora", float("nan")), color="gray", linestyle="--", label="float + LoRA")
    ax.set_xlabel("bits")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.set_xticks([int(b) for b in bits])
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M, Shakespeare, group 32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(results: dict, path: Path = ROOT / "results" / "quality.json") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    if "float" in results and any("gptq_base" in v for k, v in results.items() if k.isdigit()):
        path.with_suffix(".md").write_text(markdown(results))
        plot(results, path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 bits, 5 steps, 8 eval windows")
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--eval-windows", type=int, default=Budget.eval_windows)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(MODES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="only these exact-merge modes")
    parser.add_argument("--no-unconstrained", action="store_true", help="skip the unconstrained adapter's rows")
    parser.add_argument("--domain", choices=["shakespeare", "milton"], default="shakespeare")
    parser.add_argument("--out", type=Path, help="result JSON (default results/quality.json or quality-PART.json)")
    parser.add_argument("--add", action="store_true", help="keep the rows already in --out, add this run's")
    parser.add_argument("--part", choices=["all", "qalora", "baselines", "references"], default="all")
    parser.add_argument("--join", nargs="+", type=Path, help="join result JSONs into results/quality.*; no run")
    args = parser.parse_args()
    if args.join:
        results = join(args.join)
        save(results)
        print(markdown(results))
        print(json.dumps(results))
        return
    if args.quick:
        budget = Budget(steps=3, eval_windows=4, bits=[4], skip=args.skip)
    else:
        budget = Budget(args.steps, args.eval_windows, bits=args.bits, skip=args.skip)
    budget.domain, budget.modes, budget.unconstrained = args.domain, args.modes, not args.no_unconstrained
    work = cache_dir() / "bench" / f"{args.domain}-{budget.steps}"
    work.mkdir(parents=True, exist_ok=True)
    results = run(budget, work, args.part, args.out, args.add)
    print(markdown(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
