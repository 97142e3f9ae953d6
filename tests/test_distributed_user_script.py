"""A user's own script (transformers' Trainer, TRL's SFTTrainer) on a QA-LoRA model, under torchrun.

tests/helpers/ddp_user_script.py is launched once with `torchrun --nproc_per_node 2` (gloo, CPU) and once with plain
`python`; both train the same seeded adapter on the same global batch of 4 sequences (2 per process). The
2-process adapters must equal the single-process ones, only rank 0 may write, and logs are printed once.
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

pytest.importorskip("trl")

VENV_BIN = Path(sys.executable).parent
SCRIPT = HELPERS / "ddp_user_script.py"
TIMEOUT = 240
STEPS = 2
RUNS = {  # name -> the script's run settings; plain SGD, so the step is the averaged gradient itself
    "trainer": dict(kind="trainer", steps=STEPS, lr=0.1),
    "sft": dict(kind="sft", steps=STEPS, lr=0.1),
    # TRL's loss divided by each process's own token count (not the global one): the wrong mean, the teeth
    "sft_local_mean": dict(kind="sft", steps=STEPS, lr=0.1, average_tokens_across_devices=False),
}
# Two SGD steps at lr 0.1: the 2-process and 1-process runs differ only in the order of fp32 sums (two
# half-batch gradients all-reduced vs one batch; the token count summed over processes vs counted at once),
# ~1e-7 relative per sum, carried through a second step from parameters that differ by that much. 1e-5 of the
# largest update leaves room for ~100 such roundings; a gradient off by a factor (one process's half missing,
# a per-process instead of global token mean) is off by ~0.1-0.5 of the update. Measured: 2.0e-7 (Trainer),
# 3.4e-7 (SFTTrainer); the per-process token mean: 0.27.
TOLERANCE = 1e-5


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def launched(tiny_gptq_factory, tmp_path_factory):
    base = tiny_gptq_factory(4)
    root = tmp_path_factory.mktemp("user-script")
    single_runs = {k: v for k, v in RUNS.items() if k != "sft_local_mean"}  # one process: no other mean exists
    ddp = _run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", str(SCRIPT), str(base), str(root / "ddp"),
                json.dumps(RUNS)], root)
    _run([str(VENV_BIN / "python"), str(SCRIPT), str(base), str(root / "single"), json.dumps(single_runs)], root)
    return root, ddp


def _error(root: Path, ddp_name: str, single_name: str) -> tuple[float, float]:
    """(max |ddp - single|, largest update): B and the scale factors start at 0, so their values are the update."""
    ddp = load_file(root / "ddp" / ddp_name / "adapter_model.safetensors")
    single = load_file(root / "single" / single_name / "adapter_model.safetensors")
    assert ddp.keys() == single.keys() and any("qalora_scale" in k for k in single)
    error = max((ddp[k] - single[k]).abs().max().item() for k in ddp)
    moved = max(single[k].abs().max().item() for k in single if "qalora_A" not in k)
    return error, moved


@pytest.mark.parametrize("name", ["trainer", "sft"])
def test_user_script_under_torchrun_equals_one_process(launched, name):
    root, _ = launched
    error, moved = _error(root, name, name)
    print(f"{name}: max |2 processes - 1 process| = {error:.3g} = {error / moved:.3g} of the largest update")
    assert moved > 1e-3  # it trained
    assert error <= TOLERANCE * moved


def test_a_per_process_token_mean_is_caught(launched):
    """The tolerance has teeth: SFTTrainer with each process's loss averaged over its own tokens (texts of
    different lengths) takes a different step, far outside it."""
    root, _ = launched
    error, moved = _error(root, "sft_local_mean", "sft")
    print(f"sft, per-process token mean: {error / moved:.3g} of the largest update")
    assert error > 1000 * TOLERANCE * moved


def test_only_rank_zero_writes_and_logs(launched):
    root, ddp = launched
    writes = {rank: json.loads((root / "ddp" / f"writes-{rank}.json").read_text()) for rank in (0, 1)}
    assert writes[1] == []
    for name in RUNS:
        assert str(root / "ddp" / name / "adapter_config.json") in writes[0]
    assert {p.name for p in (root / "ddp" / "trainer").iterdir()} == \
        {p.name for p in (root / "single" / "trainer").iterdir()}
    assert ddp.stdout.count("{'loss'") == STEPS * len(RUNS)  # Trainer's log lines, from rank 0 only
