"""The GPU check's timing and report: training steps of SmolLM2-135M and a 7B-shaped slice on one device.

Question: does training run where people train (one NVIDIA GPU), and what does a step cost there?
`benchmarks/gpu_check.sh` runs the device tests first, then this, and passes their outcome in.

Models, every decoder linear a GPTQ layer loaded with peft_qalora.load_gptq_model (gptq_torch) and moved to
the device, adapters on the 7 projections, AdamW lr 2e-4, no gradient checkpointing:
* smollm2: SmolLM2-135M-Instruct, 4-bit g32: the demo's GPTQ checkpoint if the cache holds it, else the float
  model from the cache ($PEFT_QALORA_CACHE/smollm2-135m-instruct) round-to-nearest quantized once (gptq.rtn;
  a step costs the same whatever the codes); batch 4 x 256.
* slice7b: 2 LLaMA decoder layers at 7B widths (hidden 4096, intermediate 11008), 4-bit g128, random codes
  (`train_memory.slice_folder`, written once into the cache); batch 1 x 512.
* tiny (`--tiny`): the tests' tiny LLaMA, batch 2 x 16: the CPU dry run that keeps this code from rotting.
Kinds: "default" (scales only: `peft-qalora train`'s default), "adapter" (exact adapter + trained scales, r=16)
and "plain" (merge_strategy="nearest", r=16).

    python benchmarks/gpu_check.py --device cuda [--models smollm2,slice7b --warmup 1 --steps 3]
    python benchmarks/gpu_check.py --device cpu --tiny                                     # ~30 s on 2 cores

Prints a Markdown table, ends with one JSON line; writes results/gpu_check.{json,md} (`--results`, `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))
from report import publish  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {"default": dict(scales_only=True), "adapter": dict(merge_strategy="exact", train_scales=True),
         "plain": dict(merge_strategy="nearest")}
BATCH = {"smollm2": (4, 256), "slice7b": (1, 512), "tiny": (2, 16)}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def rtn_checkpoint(model, folder: Path, bits: int, group_size: int, tokenizer_from: Path | None = None) -> Path:
    """Write a float LLaMA-style model as a v1 GPTQ checkpoint, every decoder linear RTN-quantized."""
    from peft_qalora.gptq import checkpoint as ckpt
    from peft_qalora.gptq.rtn import rtn_quantize

    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            qt = rtn_quantize(module.weight.data, bits, group_size)
            tensors.update({f"{name}.qweight": qt.qweight, f"{name}.qzeros": qt.qzeros, f"{name}.scales": qt.scales,
                            f"{name}.g_idx": qt.g_idx})
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] + ".qweight" not in tensors:
            tensors[key] = value.half()
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    ckpt.write_shard(tmp / "model.safetensors", tensors)
    config = model.config.to_dict()
    config["dtype"] = "float16"
    ckpt.write_configs(tmp, config, ckpt.output_quant_config({"bits": bits, "group_size": group_size,
                                                               "desc_act": False}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_from is not None and (tokenizer_from / name).is_file():
            (tmp / name).write_bytes((tokenizer_from / name).read_bytes())
    tmp.rename(folder)  # whole or not at all
    return folder


def smollm2_base() -> Path:
    from peft_qalora.assets import cache_dir, smollm2_dir

    demo = cache_dir() / "demo" / "smollm2-gptq-4b-g32"
    if (demo / "config.json").is_file():
        return demo
    folder = cache_dir() / "gpu-check" / "smollm2-rtn-4b-g32"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        source = smollm2_dir()  # offline: the folder must already be in the cache (gpu_check.sh says how)
        folder.parent.mkdir(parents=True, exist_ok=True)
        rtn_checkpoint(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), folder, 4, 32, source)
    return folder


def tiny_base(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        folder.parent.mkdir(parents=True, exist_ok=True)
        rtn_checkpoint(LlamaForCausalLM(LlamaConfig(**TINY)), folder, 4, 32)
    return folder


def base_folder(model: str, scratch: Path) -> Path:
    if model == "smollm2":
        return smollm2_base()
    if model == "slice7b":
        from train_memory import slice_folder

        return slice_folder()
    return tiny_base(scratch / "tiny-rtn-4b-g32")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(folder: Path, kind: str, device: torch.device, batch: tuple[int, int], warmup: int, steps: int) -> dict:
    """Load, adapt, move to `device`, then `warmup` + `steps` optimizer steps on random tokens; seconds and memory."""
    import peft_qalora
    from peft import get_peft_model

    started = time.perf_counter()
    model = peft_qalora.prepare_model_for_training(peft_qalora.load_gptq_model(folder), gradient_checkpointing=False)
    model = get_peft_model(model, peft_qalora.QALoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, **KINDS[kind]))
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    tensors = list(model.named_parameters()) + list(model.named_buffers())  # g_idx: GPTQModel may keep it on the CPU
    elsewhere = [n for n, t in tensors if t.device.type != device.type and not n.endswith("g_idx")][:5]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, batch, generator=gen).to(device) for _ in range(warmup + steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    load_s = time.perf_counter() - started
    times, losses = [], []
    for i, ids in enumerate(data):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        losses.append(float(loss.detach()))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"kind": kind, "device": str(trainable[0].device), "load_s": load_s, "step_times": times,
            "step_s": step_s, "tokens_per_s": batch[0] * batch[1] / step_s, "losses": losses,
            "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "params_off_device": elsewhere, "trainable_parameters": sum(p.numel() for p in trainable),
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def pytest_summary(junit: str | None, rc: int | None, seconds: float | None) -> dict | None:
    """Counts from pytest's JUnit XML, with its exit code and wall time (None: no tests were run)."""
    if junit is None and rc is None:
        return None
    out = {"rc": rc, "seconds": seconds, "passed": rc == 0}
    if junit and Path(junit).is_file():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        out.update(counts, failed_tests=[f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                         if c.find("failure") is not None or c.find("error") is not None])
        out["passed"] = rc == 0 and counts["tests"] > 0 and not counts["failures"] and not counts["errors"]
    return out


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "peft", "gptqmodel", "triton", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    env = {"python": platform.python_version(), "host": platform.node(), "versions": versions,
           "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


def table(out: dict) -> str:
    env, tests = out["environment"], out["tests"]
    lines = [f"GPU check on {env.get('gpu') or 'the CPU (dry run)'} ({env['device']}), torch {env['versions']['torch']}"
             f" (CUDA {env['cuda']}), transformers {env['versions']['transformers']}, peft {env['versions']['peft']}, "
             f"gptqmodel {env['versions']['gptqmodel']}. {out['warmup']} warm-up + {out['steps']} timed optimizer "
             "steps per row, r=16 on the 7 projections, AdamW, no gradient checkpointing.", ""]
    if tests is None:
        lines.append("Device tests: not run.")
    else:
        counts = f"{tests.get('tests', '?')} tests, {tests.get('failures', '?')} failures, {tests.get('errors', '?')} errors"
        lines.append(f"Device tests (tests/test_device_agnostic.py on {env['device']}): "
                     f"{'passed' if tests['passed'] else 'FAILED'} ({counts}, rc {tests['rc']}, "
                     f"{tests['seconds'] or 0:.0f} s).")
    lines += ["", "| model | kind | batch | s/step | tokens/s | peak GPU MB | load s | first → last loss |",
              "|---|---|---|---|---|---|---|---|"]
    for row in out["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['kind']} | | FAILED: {row['error']} | | | | |")
            continue
        peak = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        lines.append(f"| {row['model']} | {row['kind']} | {row['batch'][0]} x {row['batch'][1]} | {row['step_s']:.3f} | "
                     f"{row['tokens_per_s']:.0f} | {peak} | {row['load_s']:.1f} | "
                     f"{row['losses'][0]:.3f} → {row['losses'][-1]:.3f} |")
    verdict = ("PASS" if out["ok"] else "FAIL") if out["complete"] else "INCOMPLETE (stopped before the last row)"
    lines += ["", f"Overall: {verdict}; {out['seconds']:.0f} s for the timing part."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="smollm2,slice7b")
    parser.add_argument("--kinds", default="default,adapter,plain")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny LLaMA only: a dry run for the CPU")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pytest-junit")
    parser.add_argument("--pytest-rc", type=int)
    parser.add_argument("--pytest-seconds", type=float)
    parser.add_argument("--out", default="gpu_check", help="results/<out>.{json,md}")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the folder of --out's files")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device {args.device} but torch {torch.__version__} sees no CUDA GPU.")
    started = time.perf_counter()
    models = ["tiny"] if args.tiny else args.models.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            for kind in args.kinds.split(","):
                row = {"model": model, "kind": kind, "batch": list(BATCH[model])}
                try:
                    folder = base_folder(model, Path(scratch))
                    row.update(time_steps(folder, kind, device, BATCH[model], args.warmup, args.steps))
                except Exception as err:  # one model failing must not hide the others' numbers
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    traceback.print_exc()
                rows.append(row)
                print(f"{model}/{kind}: {row.get('step_s', row.get('error'))}", file=sys.stderr, flush=True)
                report(args, device, rows, started, final=False)  # a check killed by its timeout keeps its rows
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return 0 if report(args, device, rows, started, final=True) else 1


def report(args, device: torch.device, rows: list[dict], started: float, final: bool) -> bool:
    """Write results/<out>.{json,md} (print them too when `final`); whether the check passed."""
    tests = pytest_summary(args.pytest_junit, args.pytest_rc, args.pytest_seconds)
    ok = final and all("error" not in r and r["finite"] and not r["params_off_device"] for r in rows)
    ok = ok and (tests is None or tests["passed"])
    out = {"ok": ok, "complete": final, "seconds": time.perf_counter() - started, "warmup": args.warmup,
           "steps": args.steps, "environment": environment(device), "tests": tests, "rows": rows}
    if final:
        publish(args.out, out, table(out), args.results)
    else:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")
        (args.results / f"{args.out}.md").write_text(table(out))
    return ok


if __name__ == "__main__":
    sys.exit(main())
