"""Training on several processes: 2 CPU processes (gloo) under torchrun and accelerate launch.

- every `train` flag survives both launchers' parsers, and the README's commands run under both;
- one optimizer step of DDP over 2 processes equals one process on the whole global batch, for every
  adapter kind, with gradient checkpointing on and off, fp32 and bf16;
- only rank 0 writes and reports; the adapter loads in a fresh process and merges like any other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HELPERS
from helpers.launchers import launcher_env
import torch
from safetensors.torch import load_file, save_file

from peft_qalora.training.recipe import TrainSettings, train_adapter

VENV_BIN = Path(sys.executable).parent
TIMEOUT = 240
LR = 1.0
COMMON = dict(steps=1, batch_size=4, learning_rate=LR, r=4, seed=0, extra={"optim": "sgd"})
RUNS = {  # name -> TrainSettings fields
    "nearest": dict(merge_strategy="nearest"),
    "nearest_gc": dict(merge_strategy="nearest", gradient_checkpointing=True),
    "exact": dict(merge_strategy="exact", train_scales=False),
    "exact_gc": dict(merge_strategy="exact", train_scales=False, gradient_checkpointing=True),
    "exact_scales": dict(merge_strategy="exact", scales_only=False),
    "exact_scales_gc": dict(merge_strategy="exact", scales_only=False, gradient_checkpointing=True),
    "exact_scales_bf16": dict(merge_strategy="exact", scales_only=False, bf16=True),
    "exact_scales_adamw": dict(merge_strategy="exact", scales_only=False, learning_rate=1e-3, extra={}),
}
# The step is plain SGD (update = lr * gradient, linear): the parameters after it compare the averaged
# gradient itself, so a wrong loss normalisation (e.g. a gradient halved) or a missing half of the batch
# shows. The error is reported relative to the largest update. fp32: the two runs differ only in the order
# of float sums (two half-batch means averaged by all-reduce vs one mean), ~1e-7 relative per sum; 1e-5
# leaves room for a few hundred of them. bf16: forward and gradients carry 8 mantissa bits (4e-3 relative)
# and the runs round different partial sums; 3e-2 is ~8 roundings and still far below a halved gradient (0.5).
# AdamW (the default optimizer) once, at lr 1e-3: its first step is lr * g / (|g| + 1e-8), which hides the
# gradient's scale and amplifies the float noise of components near eps (the tiny model has many at ~1e-8:
# measured 0.02 lr), so it is checked in units of lr: 0.05 lr, against 2 lr for a sign flip.
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "adamw": 0.05}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def _windows(n: int = 4, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq_len), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ flags under the launchers' parsers


def _train_flags() -> list[str]:
    from peft_qalora.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return [s for action in train._actions for s in action.option_strings if s.startswith("--") and s != "--help"]


def test_every_train_flag_survives_the_launchers_parsers():
    """torchrun's parser reads the whole command line and takes any unique prefix of its own options, so
    `--r` (a prefix of --rdzv-*, --role, --run-path, --redirects) exits there; our names must not."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    flags = [f for f in _train_flags() if f != "--r"]
    assert "--lora-r" in flags
    torchrun, accelerate = get_args_parser(), launch_command_parser()
    for flag in flags:
        script = ["-m", "peft_qalora.cli", "train", "b", "o", flag, "1"]
        assert torchrun.parse_args(["--nproc_per_node", "2", *script]).training_script_args[-2] == flag
        assert accelerate.parse_args(["--num_processes", "2", *script]).training_script_args[-2] == flag
    with pytest.raises(SystemExit):  # why --lora-r exists: kept as an alias where it works (accelerate, no launcher)
        torchrun.parse_args(["--nproc_per_node", "2", "-m", "peft_qalora.cli", "train", "b", "o", "--r", "4"])
    assert accelerate.parse_args(["-m", "peft_qalora.cli", "train", "--r", "4"]).training_script_args[-2:] == ["--r", "4"]


def test_global_batch_must_split_over_the_processes(monkeypatch, tmp_path):
    from peft_qalora.training.recipe import trainer_arguments

    args = trainer_arguments(TrainSettings(batch_size=6), tmp_path)
    assert (args.world_size, args.per_device_train_batch_size) == (1, 6)
    monkeypatch.setattr("transformers.TrainingArguments.world_size", property(lambda self: 4))
    with pytest.raises(ValueError, match="global batch.*multiple of 4"):
        trainer_arguments(TrainSettings(batch_size=6), tmp_path)
    assert trainer_arguments(TrainSettings(batch_size=8), tmp_path).per_device_train_batch_size == 2


def test_accelerate_cpu_single_process_is_refused(monkeypatch, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (it expects mpirun for the rest)."""
    from peft_qalora.training.recipe import trainer_arguments

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="--multi_gpu --num_processes N"):
        trainer_arguments(TrainSettings(), tmp_path)


# ------------------------------------------------------------------ the README's commands, launched


@pytest.fixture(scope="module")
def launched(tiny_gptq_factory, tmp_path_factory):
    """The README's commands, on a tiny model: torchrun with flags, accelerate with a recipe and flags."""
    base = tiny_gptq_factory(4)
    root = tmp_path_factory.mktemp("launched")
    text = root / "train.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    recipe = root / "recipe.yaml"
    recipe.write_text(f"base: {base}\nout_dir: {root / 'acc'}\nseq_len: 32\ntrain:\n  steps: 2\n  batch_size: 4\n"
                      "  gradient_checkpointing: true\n")
    commands = {
        "torchrun": [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "-m", "peft_qalora.cli", "train", str(base),
                     str(root / "tr"), "--text", str(text), "--steps", "2", "--lora-r", "4", "--batch-size", "4",
                     "--seq-len", "32", "--lr", "1e-3", "--lora-alpha", "8", "--merge-strategy", "exact",
                     "--scale-lr-ratio", "10"],
        "accelerate": [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "-m", "peft_qalora.cli", "train", "--config", str(recipe), "--text", str(text), "--r", "4"],
    }
    out = {}
    for name, cmd in commands.items():
        start = time.perf_counter()
        out[name] = _run(cmd, root)
        print(f"{name}: {time.perf_counter() - start:.1f} s")
    return {"base": base, "root": root, "results": out}


@pytest.mark.parametrize("launcher,folder", [("torchrun", "tr"), ("accelerate", "acc")])
def test_readme_commands_under_both_launchers(launched, launcher, folder):
    result, root = launched["results"][launcher], launched["root"]
    adapter = root / folder
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    assert not (root / f"{folder}.checkpoints").exists()
    out = result.stdout
    assert out.count("world size 2: batch 2 per process x 2 processes x 1 accumulation = global batch 4") == 1, out
    assert out.count("per process after step 1:") == 1 and "optimizer state" in out
    assert out.count('"adapter_dir"') == 1, out  # one summary, from rank 0
    summary = json.loads(out[out.index("{\n"):])
    assert (summary["world_size"], summary["global_batch"], summary["rank"]) == (2, 4, 0)
    assert result.stderr.count("done in") == 1
    assert "FutureWarning" not in result.stderr and "find_unused_parameters" not in result.stderr


def test_distributed_adapter_loads_and_merges_in_one_process(launched, tmp_path):
    """A 2-process `exact` adapter: fresh PeftModel.from_pretrained, file-to-file merge, merged == trained."""
    from peft import PeftModel

    from peft_qalora import load_gptq_model
    from peft_qalora.merge.files import merge_checkpoint

    base, adapter = launched["base"], launched["root"] / "tr"
    ids = _windows(2, 16)
    model = PeftModel.from_pretrained(load_gptq_model(base), adapter).eval()
    with torch.no_grad():
        trained = model(ids).logits
        plain = load_gptq_model(base).eval()(ids).logits
    assert (trained - plain).abs().max() > 1e-4  # the adapter does something
    merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    with torch.no_grad():
        merged = load_gptq_model(tmp_path / "merged").eval()(ids).logits
    assert torch.allclose(merged, trained, atol=2e-3, rtol=0), (merged - trained).abs().max()


# ------------------------------------------------------------------ DDP == one process on the global batch


@pytest.fixture(scope="module")
def equivalence(tiny_gptq_factory, tmp_path_factory):
    base = tiny_gptq_factory(4)
    root = tmp_path_factory.mktemp("ddp")
    windows = root / "windows.safetensors"
    save_file({"windows": _windows()}, windows)  # 4 windows = exactly one global batch: order cannot matter
    runs = {name: {**COMMON, **fields} for name, fields in RUNS.items()}
    start = time.perf_counter()
    result = _run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", str(HELPERS / "ddp_worker.py"),
                   str(base), str(windows), str(root / "ddp"), json.dumps(runs)], root)
    ddp_seconds = time.perf_counter() - start
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"name"')]
    start = time.perf_counter()
    losses = {}
    for name, settings in runs.items():
        losses[name] = train_adapter(base, _windows(), root / "single" / name, TrainSettings(**settings))["train_loss"]
    print(f"ddp ({len(runs)} runs, 1 launch): {ddp_seconds:.1f} s; single ({len(runs)} runs): {time.perf_counter() - start:.1f} s")
    return root, {r["name"]: {**r, "single_train_loss": losses[r["name"]]} for r in reports}


@pytest.mark.parametrize("name", list(RUNS))
def test_one_ddp_step_equals_one_process_on_the_global_batch(equivalence, name):
    root, reports = equivalence
    assert (reports[name]["world_size"], reports[name]["batch_per_process"], reports[name]["global_batch"]) == (2, 2, 4)
    ddp = load_file(root / "ddp" / name / "adapter_model.safetensors")
    single = load_file(root / "single" / name / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    error = max((ddp[k].float() - single[k].float()).abs().max().item() for k in ddp)
    # A starts random (the same in both: seeded) and does not move in step 1 (B = 0); B and the scale
    # factors start at 0, so their values are the update.
    moved = max(single[k].float().abs().max().item() for k in single if "qalora_A" not in k)
    kind = "adamw" if "adamw" in name else "bf16" if "bf16" in name else "fp32"
    relative = error / (1e-3 if kind == "adamw" else moved)
    print(f"{name}: max |ddp - single| = {error:.3g}, {relative:.3g} {'lr' if kind == 'adamw' else 'of the largest update'}")
    assert moved > 0
    assert relative <= TOLERANCE[kind]
    # the reported loss is the whole global batch's (Trainer alone would give rank 0's half for a 1-step run)
    ddp_loss, single_loss = reports[name]["train_loss"], reports[name]["single_train_loss"]
    assert abs(ddp_loss - single_loss) <= (1e-2 if kind == "bf16" else 1e-4) * single_loss, (ddp_loss, single_loss)
