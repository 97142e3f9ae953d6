"""File-to-file merge throughput on a LLaMA-7B-shaped 4-bit g32 GPTQ checkpoint, against `cp -r`.

Question: does `peft-qalora merge` run at copy speed with bounded memory, and what would 70B cost?
It generates (under $PEFT_QALORA_CACHE/bench-merge/) a random 7B-shaped checkpoint (32 layers, hidden
4096, MLP 11008, vocab 32000; random packed codes, true zeros in [1, 15], fp16 scales, contiguous
g_idx, fp16 embeddings, norms and lm_head; ~512 MB shards + index) and a random r=64 QA-LoRA adapter
on all 7 projections, then alternates `cp -r BASE COPY` and `python -m peft_qalora.cli merge` (each
timed to the command's end and again after `sync` of the files it wrote; same disk, base in the page
cache for both). Peak RSS of the merge process: GNU time %M. Per-layer cost and the 70B
extrapolation (80 layers, hidden 8192, MLP 28672, 8 KV heads, vocab 128256) scale the measured
seconds per byte of the merge; the big folders are deleted at the end.

    python benchmarks/merge_speed.py [--rounds 2]      # needs ~12 GB free; ~5-10 min

Prints a Markdown table, ends with one JSON line; writes results/merge_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))
from report import publish, scratch  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from peft_qalora.gptq import checkpoint as ckpt  # noqa: E402
from peft_qalora.gptq.tensors import encode_zeros  # noqa: E402

LLAMA_7B = {"hidden": 4096, "mlp": 11008, "layers": 32, "kv": 4096, "vocab": 32000}
LLAMA_70B = {"hidden": 8192, "mlp": 28672, "layers": 80, "kv": 1024, "vocab": 128256}
SHARD_BYTES = 512 << 20
R = 64


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    h, m, kv = shape["hidden"], shape["mlp"], shape["kv"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, m), "mlp.up_proj": (h, m), "mlp.down_proj": (m, h)}


def layer_bytes(shape: dict) -> int:
    """Bytes of one block on disk at 4 bits, group 32: codes, zeros, fp16 scales, int32 g_idx, norms."""
    total = 4 * shape["hidden"]
    for n_in, n_out in projections(shape).values():
        total += n_in * n_out // 2 + (n_in // 32) * n_out // 2 + (n_in // 32) * n_out * 2 + 4 * n_in
    return total


def model_bytes(shape: dict) -> int:
    return shape["layers"] * layer_bytes(shape) + 2 * 2 * shape["vocab"] * shape["hidden"] + 2 * shape["hidden"]


def quant_layer(n_in: int, n_out: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    groups = n_in // 32
    zeros = torch.randint(1, 16, (groups, n_out), generator=gen, dtype=torch.int32)
    return {"qweight": torch.randint(-(2**31), 2**31 - 1, (n_in // 8, n_out), generator=gen, dtype=torch.int32),
            "qzeros": encode_zeros(zeros, 4), "g_idx": torch.arange(n_in, dtype=torch.int32) // 32,
            "scales": (torch.rand(groups, n_out, generator=gen) * 0.018 + 0.002).half()}


def tensor_stream(shape: dict, gen: torch.Generator):
    h, v = shape["hidden"], shape["vocab"]
    yield "model.embed_tokens.weight", (torch.randn(v, h, generator=gen) * 0.02).half()
    for i in range(shape["layers"]):
        for name, (n_in, n_out) in projections(shape).items():
            for field, t in quant_layer(n_in, n_out, gen).items():
                yield f"model.layers.{i}.{name}.{field}", t
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"model.layers.{i}.{norm}.weight", torch.ones(h, dtype=torch.float16)
    yield "model.norm.weight", torch.ones(h, dtype=torch.float16)
    yield "lm_head.weight", (torch.randn(v, h, generator=gen) * 0.02).half()


def write_base(folder: Path, shape: dict) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen, shard, size, files, weight_map, total = torch.Generator().manual_seed(0), {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        name = f"shard-{len(files):05d}.safetensors"
        ckpt.write_shard(tmp / name, shard)
        files.append((name, list(shard)))
        shard, size = {}, 0

    for key, tensor in tensor_stream(shape, gen):
        shard[key] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (tmp / name).rename(tmp / final)
        weight_map.update({k: final for k in keys})
    ckpt.write_index(tmp, weight_map, total)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
              "intermediate_size": shape["mlp"], "num_hidden_layers": shape["layers"], "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": shape["vocab"], "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "float16", "tie_word_embeddings": False}
    quant = ckpt.output_quant_config({"bits": 4, "group_size": 32, "desc_act": False})
    ckpt.write_configs(tmp, config, quant)
    tmp.rename(folder)


def write_adapter(folder: Path, shape: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    gen, tensors = torch.Generator().manual_seed(1), {}
    for i in range(shape["layers"]):
        for name, (n_in, n_out) in projections(shape).items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{prefix}.qalora_A.weight"] = torch.randn(R, n_in // 32, generator=gen) * 0.1
            tensors[f"{prefix}.qalora_B.weight"] = torch.randn(n_out, R, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "QALORA", "r": R, "lora_alpha": 16, "group_size": None, "merge_strategy": "nearest",
              "target_modules": [n.split(".")[-1] for n in projections(shape)], "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def timed(cmd: list[str], out: Path, env: dict | None = None) -> dict:
    """Wall seconds to the end of `cmd`, then to the end of fsyncing its output (a folder or one file); peak RSS
    of `cmd` and the children it waited for (GNU time's %M: a fork of this big Python process would report the
    parent's pages)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    subprocess.run(["sync", *map(str, out.iterdir() if out.is_dir() else [out])], check=True)
    return {"seconds": seconds, "seconds_synced": time.perf_counter() - start,
            "peak_rss_mb": int(proc.stderr.strip().splitlines()[-1]) / 1024, "stdout": proc.stdout}


def run(work: Path, rounds: int) -> dict:
    base, adapter = work / "llama7b-gptq-4b-g32", work / "adapter-r64"
    if not base.is_dir():
        start = time.perf_counter()
        write_base(base, LLAMA_7B)
        print(f"generated the base in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not adapter.is_dir():
        write_adapter(adapter, LLAMA_7B)
    os.sync()  # the generated files' write-back would otherwise land inside the first round's cp
    merge_cmd = [sys.executable, "-m", "peft_qalora.cli", "merge", "--base", str(base), "--adapter", str(adapter)]
    runs: dict[str, list] = {"cp": [], "merge": []}
    for r in range(rounds):
        for kind in ("cp", "merge"):
            out = work / f"{kind}-out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ["cp", "-r", str(base), str(out)] if kind == "cp" else merge_cmd + ["--out", str(out)]
            runs[kind].append(timed(cmd, out))
            runs[kind][-1].pop("stdout")
            if kind == "merge":
                runs[kind][-1]["report_seconds"] = json.loads((out / "merge_report.json").read_text())["seconds"]
            shutil.rmtree(out)
            print(f"round {r} {kind}: {runs[kind][-1]}", file=sys.stderr)
    return summarize(runs, base)


def summarize(runs: dict, base: Path) -> dict:
    med = lambda kind, key: statistics.median(r[key] for r in runs[kind])  # noqa: E731
    size = sum(p.stat().st_size for p in base.iterdir())
    merge_s, cp_s, work_s = med("merge", "seconds_synced"), med("cp", "seconds_synced"), med("merge", "report_seconds")
    per_byte = work_s / model_bytes(LLAMA_7B)
    startup = merge_s - work_s  # interpreter, imports, planning outside merge_checkpoint's clock, final sync
    est_70b = startup + per_byte * model_bytes(LLAMA_70B)
    return {
        "runs": runs, "checkpoint_gb": size / 1e9, "shards": len(ckpt.shard_files(base)),
        "merge_s": merge_s, "cp_s": cp_s, "merge_over_cp": merge_s / cp_s,
        "merge_over_cp_unsynced": med("merge", "seconds") / med("cp", "seconds"),
        "merge_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["merge"]),
        "per_layer_s_7b": per_byte * layer_bytes(LLAMA_7B), "per_layer_s_70b": per_byte * layer_bytes(LLAMA_70B),
        "est_70b_merge_s": est_70b, "est_70b_cp_s": cp_s * model_bytes(LLAMA_70B) / model_bytes(LLAMA_7B),
        "gb_70b": model_bytes(LLAMA_70B) / 1e9,
        "adapter_70b_r64_fp32_gb": sum(R * (i // 32 + o) for i, o in projections(LLAMA_70B).values()) * 80 * 4 / 1e9,
        "targets": {"merge_within_2x_of_cp": merge_s / cp_s <= 2, "peak_under_2gb": max(r["peak_rss_mb"] for r in runs["merge"]) < 2048},
    }


def markdown(s: dict) -> str:
    return "\n".join([
        f"File-to-file merge of a LLaMA-7B-shaped 4-bit g32 GPTQ checkpoint ({s['checkpoint_gb']:.2f} GB, "
        f"{s['shards']} shards), r=64 adapter on all 224 projections; median of {len(s['runs']['cp'])} alternating "
        "rounds, each timed until its output was fsynced.", "",
        "| operation | seconds | x cp | peak RSS MB |", "|---|---|---|---|",
        f"| `cp -r` | {s['cp_s']:.1f} | 1.00 | - |",
        f"| `peft-qalora merge` | {s['merge_s']:.1f} | {s['merge_over_cp']:.2f} | {s['merge_peak_rss_mb']:.0f} |", "",
        f"Without the fsync: merge / cp = {s['merge_over_cp_unsynced']:.2f}. Per-layer cost {s['per_layer_s_7b']:.2f} s "
        f"(7B block); a 70B block ({s['gb_70b']:.0f} GB model) {s['per_layer_s_70b']:.2f} s, so about "
        f"{s['est_70b_merge_s'] / 60:.1f} min for 80 layers against ~{s['est_70b_cp_s'] / 60:.1f} min to copy; "
        f"its r=64 fp32 adapter alone is {s['adapter_70b_r64_fp32_gb']:.2f} GB (read whole by the merge).",
        "Targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in s["targets"].items())]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint and adapter")
    args = parser.parse_args()
    with scratch("bench-merge", 12, args.keep) as work:
        summary = run(work, args.rounds)
    text = markdown(summary)
    publish("merge_speed", summary, text)


if __name__ == "__main__":
    main()
