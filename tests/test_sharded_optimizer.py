"""Sharded adapter state: FSDP2 `fully_shard` per QALoraLinear over 2 CPU processes (gloo).

An `exact` adapter with trained scales, one optimizer step from the same seeded start on one global batch of
4 windows: one process on the whole batch, DDP and FSDP2 over 2 processes (tests/helpers/fsdp_probe.py). FSDP2 must
leave the same adapter as both, and each process must hold half the adapter, gradients and AdamW state, the
frozen quantized weights whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HELPERS
from helpers.launchers import launcher_env
from safetensors.torch import load_file

VENV_BIN = Path(sys.executable).parent
PROBE = HELPERS / "fsdp_probe.py"
TIMEOUT = 180
# SGD at lr 1: the step is the averaged gradient itself, so a missing or doubled gradient half shows (an error
# of 0.5 relative). The runs differ only in the order of fp32 sums (reduce-scatter / all-reduce of two
# half-batch gradients vs one sum), ~1e-7 relative each: 1e-5 of the largest update leaves room for a hundred
# of them (measured: see the report). AdamW at lr 1e-3: its first step is lr * g / (|g| + eps),
# which hides the gradient's scale, so it is checked in units of lr as in test_distributed: 0.05 lr against
# 2 lr for a sign flip (measured: 2e-5 lr).
TOLERANCE = {"sgd": 1e-5, "adamw": 0.05}
LR = {"sgd": 1.0, "adamw": 1e-3}


def _run(mode: str, base: Path, out: Path) -> list[dict]:
    launcher = ([str(VENV_BIN / "python")] if mode == "single"
                else [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2"])
    cmd = [*launcher, str(PROBE), str(base), str(out / mode), mode]
    result = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=out)
    assert result.returncode == 0, \
        f"{' '.join(cmd)}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return [json.loads(f.read_text()) for f in sorted((out / mode).glob("report-*.json"))]


@pytest.fixture(scope="module")
def runs(tiny_gptq_factory, tmp_path_factory):
    base = tiny_gptq_factory(4)
    out = tmp_path_factory.mktemp("sharded")
    return {mode: (_run(mode, base, out), out / mode) for mode in ("single", "ddp", "fsdp")}


def _report(runs, mode, optim, rank=0) -> dict:
    return next(r for r in runs[mode][0] if r["optim"] == optim and r["rank"] == rank)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("reference", ["single", "ddp"])
def test_sharded_step_equals_unsharded(runs, optim, reference):
    ref = load_file(runs[reference][1] / f"{optim}.safetensors")
    got = load_file(runs["fsdp"][1] / f"{optim}.safetensors")
    assert ref.keys() == got.keys() and any("qalora_scale" in k for k in ref)
    assert all(ref[k].shape == got[k].shape for k in ref)
    err = max((ref[k] - got[k]).abs().max().item() for k in ref)
    start = load_file(runs[reference][1] / "start.safetensors")
    assert start.keys() == ref.keys() and all((start[k] == load_file(runs["fsdp"][1] / "start.safetensors")[k]).all()
                                              for k in start)  # the same seeded start
    update = max((ref[k] - start[k]).abs().max().item() for k in ref)
    assert update > 1e-3 * LR[optim]  # the step moved the adapter
    if optim == "sgd":  # relative to the largest update
        assert err <= TOLERANCE["sgd"] * update, (err, update)
    else:
        assert err <= TOLERANCE["adamw"] * LR["adamw"], err


def test_adapter_gradients_and_adamw_state_are_sharded(runs):
    single = _report(runs, "single", "adamw")
    ddp = _report(runs, "ddp", "adamw")
    for rank in (0, 1):
        fsdp = _report(runs, "fsdp", "adamw", rank)
        assert fsdp["adapter_types"] == ["DTensor"] and fsdp["placements"] == ["(Shard(dim=0),)"]
        assert fsdp["frozen_dtensors"] == 0
        assert fsdp["weights"] == single["weights"] == ddp["weights"]  # frozen quantized weights: replicated
        assert fsdp["kernel_caches"] == single["kernel_caches"]
        for key in ("adapter", "gradients", "optimizer_state"):
            # DDP holds all of it on every process; FSDP2 half, plus padding of uneven dim-0 shards and
            # AdamW's per-parameter `step` scalars (replicated): measured 26,280 vs 52,392 bytes
            assert ddp[key] == single[key] > 0
            assert 0.45 * single[key] <= fsdp[key] <= 0.55 * single[key], (key, fsdp[key], single[key])


# ------------------------------------------------------------------ the same through train_adapter (Trainer)


def test_trainer_run_with_sharded_adapter_equals_one_process(tiny_gptq_factory, tmp_path):
    """Two AdamW steps of `train_adapter` (Trainer: its AdamW, gradient clipping at 1.0, gradient
    checkpointing on) with the adapter sharded over 2 processes, against one process on the same global
    batches. tests/helpers/fsdp_trainer_worker.py runs train_adapter with shard_optimizer=True. Tolerance: 0.05 lr a
    step as in test_distributed (measured: ~1e-3 lr)."""
    import torch
    from safetensors.torch import save_file

    from peft_qalora.training.recipe import TrainSettings, train_adapter

    base = tiny_gptq_factory(4)
    windows = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    save_file({"windows": windows}, tmp_path / "windows.safetensors")
    settings = dict(steps=2, batch_size=4, r=4, learning_rate=1e-3, merge_strategy="exact", gradient_checkpointing=True)
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", str(PROBE.with_name("fsdp_trainer_worker.py")),
           str(base), str(tmp_path / "windows.safetensors"), str(tmp_path / "sharded"), json.dumps(settings)]
    result = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"seconds"')))
    assert report["adapter_types"] == ["DTensor"] and report["world_size"] == 2
    lines = []
    train_adapter(base, windows, tmp_path / "single", TrainSettings(**settings), echo=lines.append)

    def optimizer_mb(echo):
        after = next(line for line in echo if line.startswith("per process after step 1"))
        return float(after.rpartition("optimizer state ")[2].split()[0])

    assert optimizer_mb(report["echo"]) < 0.7 * optimizer_mb(lines)  # echo rounds to 0.01 MB: 0.03 vs 0.05
    ref = load_file(tmp_path / "single" / "adapter_model.safetensors")
    got = load_file(tmp_path / "sharded" / "adapter_model.safetensors")
    assert ref.keys() == got.keys() and all(ref[k].shape == got[k].shape for k in ref)
    err = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert err <= 2 * TOLERANCE["adamw"] * LR["adamw"], err


def test_shard_optimizer_refuses_checkpoints_it_cannot_write_whole():
    from peft_qalora.training.recipe import TrainSettings

    for bad in (dict(save_steps=5), dict(resume=True)):
        with pytest.raises(ValueError, match="shard_optimizer cannot be combined with save_steps / resume"):
            TrainSettings(shard_optimizer=True, **bad)
