"""A training run killed with SIGKILL and resumed ends where an uninterrupted run ends: the adapter's A,
B and trained scales, and the optimizer state, equal to float tolerance (same data order and seed).
Through our command line (`--save-steps`, `--resume`) and through a user's own `transformers.Trainer`
on a QA-LoRA model (`resume_from_checkpoint`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers.killable import Child
from peft_qalora import QALoraConfig, load_gptq_model, prepare_model_for_training
from peft_qalora.utils.atomic import pause_point
from peft_qalora.training.data import lm_dataset

# 9 windows of 32 tokens, 2 a step: the 6 steps cross an epoch (its data order comes from the restored RNG)
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 4
STEPS, SAVE, KILL = 6, 2, 5  # checkpoints at 2, 4, 6; killed after step 5, so steps 5 and 6 run again
TOLERANCE = 1e-6


def max_abs_difference(one: dict, two: dict) -> float:
    assert one.keys() == two.keys()
    return max(float((one[k].float() - two[k].float()).abs().max()) for k in one)


def adapter_tensors(folder: Path) -> dict:
    tensors = load_file(folder / "adapter_model.safetensors")
    assert {"qalora_A", "qalora_B", "qalora_scale"} == {p for k in tensors for p in k.split(".") if "qalora" in p}
    return tensors


# ----------------------------------------------------------------- peft-qalora train


def cli_train(base, text, out, *flags):
    from peft_qalora.cli import main

    main(["train", str(base), str(out), "--text", str(text), "--steps", str(STEPS), "--batch-size", "2",
          "--seq-len", "32", "--r", "4", "--lr", "1e-2", "--save-steps", str(SAVE), *flags])


def test_cli_train_killed_and_resumed_equals_uninterrupted(tiny_gptq, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cli_train(tiny_gptq, text, tmp_path / "whole")
    assert not (tmp_path / "whole.checkpoints").exists()  # removed once the adapter is written

    out, checkpoints = tmp_path / "killed", tmp_path / "killed.checkpoints"
    child = Child(cli_train, (tiny_gptq, text, out), tmp_path / "paused", pause_at=f"step-{KILL}")
    child.wait_paused()
    child.kill()
    assert not out.exists() and sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    adapter_tensors(checkpoints / "checkpoint-4")  # peft's save inside Trainer's checkpoint holds the scales
    with pytest.raises(SystemExit, match="holds the checkpoints of an unfinished run; pass --resume"):
        cli_train(tiny_gptq, text, out)
    # a kill while Trainer saved checkpoint-6 would leave it without trainer_state.json (written last)
    shutil.copytree(checkpoints / "checkpoint-4", checkpoints / "checkpoint-6")
    (checkpoints / "checkpoint-6" / "trainer_state.json").unlink()

    capsys.readouterr()
    cli_train(tiny_gptq, text, out, "--resume")
    assert '"resumed_from_step": 4' in capsys.readouterr().out  # not a fresh run that happens to agree
    assert not checkpoints.exists()
    whole, resumed = adapter_tensors(tmp_path / "whole"), adapter_tensors(out)
    error = max_abs_difference(whole, resumed)
    print(f"peft-qalora train --resume: max |resumed - uninterrupted| = {error:.3g} over {len(whole)} tensors")
    assert error <= TOLERANCE
    assert any(float(t.abs().max()) > 1e-3 for k, t in whole.items() if "qalora_scale" in k)  # scales trained


# ----------------------------------------------------------------- a user's own Trainer


class _PauseAtStep(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        pause_point(f"step-{state.global_step}")


def user_trainer(base, out, resume=False) -> int:
    """What a user writes: QA-LoRA on a GPTQ model, transformers' Trainer, checkpoints every SAVE steps.
    Returns how many steps this call ran."""
    from helpers.tiny import tiny_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(prepare_model_for_training(load_gptq_model(base)), QALoraConfig(r=4, lora_alpha=8))
    windows = torch.tensor([ord(c) % 128 for c in TEXT])[: 9 * 32].view(9, 32)
    args = TrainingArguments(str(out), max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=2,
                             learning_rate=1e-2, warmup_steps=2, report_to=[], use_cpu=True, logging_steps=100,
                             seed=0)
    counter = _PauseAtStep()
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(windows), processing_class=tiny_tokenizer(),
                      callbacks=[counter])
    trainer.train(resume_from_checkpoint=True if resume else None)
    return counter.steps


def test_user_trainer_resume_from_checkpoint_equals_uninterrupted(tiny_gptq, tmp_path):
    user_trainer(tiny_gptq, tmp_path / "whole")
    child = Child(user_trainer, (tiny_gptq, tmp_path / "killed"), tmp_path / "paused", pause_at=f"step-{KILL}")
    child.wait_paused()
    child.kill()
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.copytree(tmp_path / "killed", tmp_path / "no-optimizer")
    assert user_trainer(tiny_gptq, tmp_path / "killed", resume=True) == STEPS - 4

    final = [tmp_path / run / f"checkpoint-{STEPS}" for run in ("whole", "killed")]
    error = max_abs_difference(*(adapter_tensors(f) for f in final))
    optimizers = [torch.load(f / "optimizer.pt", weights_only=True)["state"] for f in final]
    assert optimizers[0].keys() == optimizers[1].keys()
    moments = [{f"{i}.{k}": v for i, s in o.items() for k, v in s.items() if k != "step"} for o in optimizers]
    optimizer_error = max_abs_difference(*moments)
    assert all(int(s["step"]) == STEPS for o in optimizers for s in o.values())
    print(f"Trainer(resume_from_checkpoint=True): max |resumed - uninterrupted| = {error:.3g} (adapter), "
          f"{optimizer_error:.3g} (Adam moments)")
    assert error <= TOLERANCE and optimizer_error <= TOLERANCE

    # the comparison has teeth: the same resume with the Adam moments lost ends elsewhere
    (tmp_path / "no-optimizer" / "checkpoint-4" / "optimizer.pt").unlink()
    user_trainer(tiny_gptq, tmp_path / "no-optimizer", resume=True)
    lost = max_abs_difference(adapter_tensors(final[0]), adapter_tensors(tmp_path / "no-optimizer" / final[0].name))
    print(f"the same resume without optimizer.pt: max difference {lost:.3g}")
    assert lost > 1000 * TOLERANCE, lost


def test_settings_flags_and_refusals(tiny_gptq, tmp_path):
    from peft_qalora.cli import build_parser, load_recipe, train_settings
    from peft_qalora.training.recipe import TrainSettings, train_adapter

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  save_steps: 5\n  resume: true\n")
    args = build_parser().parse_args(["train", "--config", str(recipe), "--save-steps", "3"])
    assert (lambda s: (s.save_steps, s.resume))(train_settings(args, load_recipe(str(recipe)))) == (3, True)
    with pytest.raises(ValueError, match=r"TrainSettings: save_steps=-1; use a positive step count, or 0 for none"):
        TrainSettings(save_steps=-1)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileExistsError, match=r"train: .*adapter already exists; choose another folder or pass "
                                              r"--overwrite"):  # before training, not after
        train_adapter(tiny_gptq, torch.zeros(2, 8, dtype=torch.long), tmp_path / "adapter", TrainSettings())


# ----------------------------------------------------------------- peft-qalora train under torchrun


def torchrun_train(base, text, out, *flags, env=None, wait=True):
    """`torchrun --nproc_per_node 2 -m peft_qalora.cli train ...` (gloo)."""
    import subprocess
    import sys

    from helpers.launchers import launcher_env

    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "peft_qalora.cli", "train",
           str(base), str(out), "--text", str(text), "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32",
           "--lora-r", "4", "--lr", "1e-2", "--save-steps", str(SAVE), *flags]
    proc = subprocess.Popen(cmd, env={**launcher_env(), **(env or {})}, cwd=Path(out).parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    return stdout


def test_two_process_train_killed_and_resumed_equals_uninterrupted(tiny_gptq, tmp_path):
    """2 processes, 1 sequence each a step: killed (SIGKILL to torchrun and its workers) after step 5, resumed
    with --resume under torchrun from checkpoint-4 (its per-rank RNG states), against an uninterrupted
    2-process run: the same float operations in the same order, so the same tolerance as one process."""
    import signal
    import time

    import psutil

    from peft_qalora.utils.atomic import PAUSE_AT, PAUSED

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    torchrun_train(tiny_gptq, text, tmp_path / "whole")
    assert not (tmp_path / "whole.checkpoints").exists()

    out, checkpoints, marker = tmp_path / "killed", tmp_path / "killed.checkpoints", tmp_path / "paused"
    proc = torchrun_train(tiny_gptq, text, out, env={PAUSE_AT: f"step-{KILL}", PAUSED: str(marker)}, wait=False)
    deadline = time.monotonic() + 240
    while not marker.exists():  # every rank pauses after step 5; the first one creates the marker
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        assert time.monotonic() < deadline, "the launched run did not reach step 5 in time"
        time.sleep(0.05)
    for child in psutil.Process(proc.pid).children(recursive=True):  # torchrun starts its workers in new sessions
        child.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists() and sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (checkpoints / "checkpoint-4").glob("rng_state*")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]  # each rank's RNG, restored by its rank

    stdout = torchrun_train(tiny_gptq, text, out, "--resume")
    assert '"resumed_from_step": 4' in stdout and stdout.count('"adapter_dir"') == 1  # rank 0's summary only
    assert not checkpoints.exists()
    whole, resumed = adapter_tensors(tmp_path / "whole"), adapter_tensors(out)
    error = max_abs_difference(whole, resumed)
    print(f"torchrun (2 processes) train --resume: max |resumed - uninterrupted| = {error:.3g} over {len(whole)} tensors")
    assert error <= TOLERANCE
    assert any(float(t.abs().max()) > 1e-3 for k, t in whole.items() if "qalora_scale" in k)  # scales trained
