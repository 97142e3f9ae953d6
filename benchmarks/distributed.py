"""Step time and memory per process of `train_adapter` on SmolLM2: 1 process vs 2 (DDP) vs 2 with the adapter
state sharded (--shard-optimizer, FSDP2), the same global batch.

Question: what does a second process cost or buy per optimizer step, how much memory does each process hold,
and what does sharding save of the optimizer state?

Model: SmolLM2-135M-Instruct (all 30 layers), every decoder linear RTN-quantized to 4-bit g64 (the kernel's
work does not depend on how the codes were chosen), loaded with load_gptq_model. Adapter: the default
`exact` with trained scales, r=16 on all linears. Global batch 4 x 128 Shakespeare tokens (1 process: 4;
2 processes: 2 each), Trainer's AdamW, no gradient checkpointing, fp32, code cache on (the default).

Modes, each a fresh launch, rounds alternating single, single_1thread, ddp, sharded:
  single          python (1 process, 2 threads)
  single_1thread  python (1 process, 1 thread): the per-core reference
  ddp             torchrun --nproc_per_node 2 (gloo; 1 thread a process)
  sharded         the same with TrainSettings(shard_optimizer=True)
This machine has 2 cores (and may be shared): two processes split them, so "2 processes" here are at best
as fast as one process on both cores, and at best twice as fast as one on one core; on GPUs each process has
its own device. Read the ratios measured side by side, not the absolute seconds.

Per process: step times (the optimizer steps after the first, from atomic.pause_point's per-step hook),
peak RSS (VmHWM) minus RSS after importing the libraries, and, from rank 0, the bytes train_adapter measures
after step 1 (train.replica_memory: weights, kernel caches, adapter, gradients, optimizer state).

    python benchmarks/distributed.py [--rounds 2 --steps 4]     # ~10 min on 2 cores

Prints a Markdown table, ends with one JSON line; writes results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))
from report import publish  # noqa: E402

BITS, GROUP, SEQ_LEN, GLOBAL_BATCH = 4, 64, 128, 4  # SmolLM2 widths (576, 1536) are multiples of 64, not 128
# name -> (processes, threads a process, shard_optimizer)
MODES = {"single": (1, 2, False), "single_1thread": (1, 1, False), "ddp": (2, 1, False), "sharded": (2, 1, True)}


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smollm2_gptq() -> Path:
    """SmolLM2-135M with every decoder linear RTN-quantized (4-bit g64), written once into the project cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_qalora.assets import cache_dir, smollm2_dir
    from peft_qalora.gptq import checkpoint as ckpt
    from peft_qalora.gptq.rtn import rtn_quantize

    folder = cache_dir() / "bench-distributed" / f"smollm2-135m-rtn-{BITS}b-g{GROUP}"
    if (folder / "config.json").is_file():
        return folder
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            qt = rtn_quantize(module.weight.data, BITS, GROUP, None)
            tensors.update({f"{name}.qweight": qt.qweight, f"{name}.qzeros": qt.qzeros, f"{name}.scales": qt.scales,
                            f"{name}.g_idx": qt.g_idx})
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] + ".qweight" not in tensors and key != "lm_head.weight":  # tied
            tensors[key] = value.half()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt.write_shard(tmp / "model.safetensors", tensors)
    config = model.config.to_dict()
    config["dtype"] = "float16"
    ckpt.write_configs(tmp, config, ckpt.output_quant_config({"bits": BITS, "group_size": GROUP, "desc_act": False}))
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def child(mode: str, steps: int, report_dir: Path) -> None:
    """One process of a run: train_adapter with a per-step clock; writes report-<rank>.json."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    rss_libs = rss_mb("VmRSS")
    from transformers import AutoTokenizer

    import peft_qalora.training.recipe as train
    from peft_qalora.assets import shakespeare_dir
    from peft_qalora.training.data import DataConfig, load_windows

    base = smollm2_gptq()
    windows, _ = load_windows(AutoTokenizer.from_pretrained(base), shakespeare_dir(),
                              DataConfig(seq_len=SEQ_LEN, train_windows=GLOBAL_BATCH * steps, eval_windows=1))
    clock, measured = [], []
    train.pause_point = lambda name: clock.append(time.perf_counter())  # called after every optimizer step
    replica_memory = train.replica_memory
    train.replica_memory = lambda *a, **k: measured.append(replica_memory(*a, **k)) or measured[-1]
    settings = train.TrainSettings(steps=steps, batch_size=GLOBAL_BATCH, scales_only=False, shard_optimizer=MODES[mode][2])
    with tempfile.TemporaryDirectory() as tmp:
        summary = train.train_adapter(base, windows, Path(tmp) / "adapter", settings, echo=lambda line: None)
    rank = summary["rank"]
    report = {"mode": mode, "rank": rank, "world_size": summary["world_size"], "threads": torch.get_num_threads(),
              "batch_per_process": summary["batch_per_process"], "global_batch": summary["global_batch"],
              "step_times": [b - a for a, b in zip(clock[:-1], clock[1:])], "train_loss": summary["train_loss"],
              "peak_rss_mb": rss_mb("VmHWM") - rss_libs, "rss_libraries_mb": rss_libs,
              "memory_after_step_1": measured[-1] if measured else None}
    (report_dir / f"report-{rank}.json").write_text(json.dumps(report))


def run_mode(mode: str, steps: int) -> list[dict]:
    processes = MODES[mode][0]
    with tempfile.TemporaryDirectory() as reports:
        launcher = [sys.executable] if processes == 1 else \
            [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes)]
        env = dict(os.environ, OMP_NUM_THREADS=str(MODES[mode][1]))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        cmd = [*launcher, __file__, "--child", mode, "--steps", str(steps), "--reports", reports]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(reports).glob("report-*.json"))]


def summarize(runs: dict[str, list[list[dict]]]) -> dict:
    out = {}
    for mode, rounds in runs.items():
        reports = [r for rs in rounds for r in rs]
        memory = next(r["memory_after_step_1"] for r in reports if r["rank"] == 0)
        out[mode] = {"processes": MODES[mode][0], "threads": MODES[mode][1],
                     "step_s": statistics.median(t for r in reports for t in r["step_times"]),
                     "round_step_s": [statistics.median(t for r in rs for t in r["step_times"]) for rs in rounds],
                     "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in reports),
                     "peak_rss_mb_all_processes": max(sum(r["peak_rss_mb"] for r in rs) for rs in rounds),
                     "memory_after_step_1_bytes": memory, "train_loss": [r["train_loss"] for r in reports if r["rank"] == 0]}
    single = out["single"]
    for s in out.values():
        s["step_over_single"] = s["step_s"] / single["step_s"]
        s["step_over_single_1thread"] = s["step_s"] / out["single_1thread"]["step_s"]
        s["sequences_per_s_over_single"] = single["step_s"] / s["step_s"]
        s["peak_rss_per_process_over_single"] = s["peak_rss_mb_per_process"] / single["peak_rss_mb_per_process"]
        for key in ("adapter", "optimizer_state"):  # gradients: freed by Trainer's zero_grad after each step
            s[f"{key}_over_single"] = s["memory_after_step_1_bytes"][key] / single["memory_after_step_1_bytes"][key]
    return out


def table(summary: dict, args) -> str:
    mb = 2**20
    rows = []
    for mode, s in summary.items():
        m = s["memory_after_step_1_bytes"]
        rows.append(f"| {mode} | {s['processes']} x {MODES[mode][1]} | {s['step_s']:.2f} | {s['step_over_single']:.2f} | "
                    f"{s['step_over_single_1thread']:.2f} | "
                    f"{s['peak_rss_mb_per_process']:.0f} | {s['peak_rss_per_process_over_single']:.2f} | "
                    f"{s['peak_rss_mb_all_processes']:.0f} | {m['weights'] / mb:.1f} | {m['kernel_caches'] / mb:.1f} | "
                    f"{m['adapter'] / mb:.2f} | {s['adapter_over_single']:.3f} | {m['optimizer_state'] / mb:.2f} | "
                    f"{s['optimizer_state_over_single']:.3f} |")
    return (f"`train_adapter` on SmolLM2-135M (30 layers, RTN 4-bit g{GROUP}), `exact` + trained scales, r=16 on all "
            f"linears, global batch {GLOBAL_BATCH} x {SEQ_LEN} tokens, AdamW, fp32; {args.rounds} alternating rounds x "
            f"{args.steps - 1} timed steps after 1 warm-up. 2 CPU cores shared by the processes (1 process: 2 threads; "
            "2 processes: 1 thread each), gloo; the machine was shared with other jobs. On 2 cores, 2 processes are at "
            "best twice as fast as 1 process on 1 thread (x single_1thread 0.5); on GPUs each process has its own "
            "device.\n\n"
            "| mode | processes x threads | s/step | x single | x single_1thread | peak RSS MB / process | x single | peak RSS MB, all processes "
            "| weights MB | kernel caches MB | adapter MB | adapter x single | AdamW state MB | AdamW x single |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "Per process, measured by train_adapter from its tensors after step 1 (rank 0; the ranks are symmetric); "
            "the gradients (as large as the adapter, sharded alike) are freed by Trainer's zero_grad after each step. "
            "Peak RSS: VmHWM minus the RSS after importing the libraries.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child")
    parser.add_argument("--reports")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, Path(args.reports))
        return
    smollm2_gptq()
    runs: dict[str, list[list[dict]]] = {}
    for r in range(args.rounds):
        for mode in MODES:
            reports = run_mode(mode, args.steps)
            runs.setdefault(mode, []).append(reports)
            print(f"round {r} {mode}: " + "; ".join(f"rank {x['rank']} {[round(t, 2) for t in x['step_times']]} s, "
                                                    f"peak {x['peak_rss_mb']:.0f} MB" for x in reports),
                  file=sys.stderr, flush=True)
    summary = summarize(runs)
    out = {"rounds": args.rounds, "steps": args.steps, "global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN,
           "summary": summary, "ratios": {**{f"{m}_step_over_single": s["step_over_single"] for m, s in summary.items()},
                      **{f"{m}_step_over_single_1thread": s["step_over_single_1thread"] for m, s in summary.items()}},
           "runs": runs}
    publish("distributed", out, table(summary, args))


if __name__ == "__main__":
    main()
