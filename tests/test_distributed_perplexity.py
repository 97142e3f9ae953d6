"""A short DDP run's merged checkpoint has the held-out perplexity of the single-process run's, within noise.

SmolLM2-135M (all 30 layers: a model cut to a few layers has a held-out perplexity of 1e5-1e8, which says
nothing), every decoder linear RTN-quantized to a 4-bit g32 GPTQ checkpoint; 6 AdamW steps (lr 1e-3, global batch 4 x 64 tokens of Shakespeare, `exact` with trained scales) by
`train_adapter` in one process (seeds 0 and 1) and by the same `train_adapter` in 2 processes under torchrun
(seed 0, tests/helpers/ddp_worker.py). Each adapter is merged file to file (merge_checkpoint), loaded back with
load_gptq_model (GPTQModel's kernel) and scored on held-out windows (evaluate.perplexity).

The noise is measured: the spread between the two single-process seeds (adapter init and data order). DDP
must land within it of the seed-0 run, and training must move the perplexity by much more than that noise,
so a DDP run that does not train (or trains on a fraction of the data) cannot pass. Measured (the test prints
it): base 73.84; merged single seed 0 46.639, seed 1 46.968 (noise 0.33); merged DDP seed 0 46.644 (0.0055 from
the single-process run). About 2-9 minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HELPERS
from helpers.launchers import launcher_env
from safetensors.torch import save_file

from peft_qalora.training.recipe import TrainSettings, train_adapter

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
SETTINGS = dict(steps=6, batch_size=4, learning_rate=1e-3, r=8, merge_strategy="exact")


def smollm2_gptq(folder: Path, bits: int = 4, group_size: int = 32) -> Path:
    """SmolLM2-135M with its decoder linears RTN-quantized into a v1 GPTQ checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_qalora.assets import smollm2_dir
    from peft_qalora.gptq import checkpoint as ckpt
    from peft_qalora.gptq.rtn import rtn_quantize

    src = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            qt = rtn_quantize(module.weight.data, bits, group_size, None)
            tensors.update({f"{name}.qweight": qt.qweight, f"{name}.qzeros": qt.qzeros,
                            f"{name}.scales": qt.scales, f"{name}.g_idx": qt.g_idx})
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] + ".qweight" not in tensors and key != "lm_head.weight":  # tied to the embedding
            tensors[key] = value.half()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_shard(folder / "model.safetensors", tensors)
    config = model.config.to_dict()
    config["dtype"] = "float16"
    ckpt.write_configs(folder, config, ckpt.output_quant_config({"bits": bits, "group_size": group_size,
                                                                 "desc_act": False}))
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return folder


def merged_perplexity(base: Path, adapter: Path, out: Path, heldout: torch.Tensor) -> float:
    from peft_qalora.evaluate import perplexity
    from peft_qalora.merge.files import merge_checkpoint
    from peft_qalora.base.load import load_gptq_model

    merge_checkpoint(base, adapter, out, progress=False)
    return perplexity(load_gptq_model(out), heldout, progress=False)


def test_ddp_merged_perplexity_equals_one_process_within_seed_noise(tmp_path):
    from transformers import AutoTokenizer

    from peft_qalora.assets import shakespeare_dir
    from peft_qalora.training.data import DataConfig, load_windows
    from peft_qalora.evaluate import perplexity
    from peft_qalora.base.load import load_gptq_model

    base = smollm2_gptq(tmp_path / "base")
    train, heldout = load_windows(AutoTokenizer.from_pretrained(base), shakespeare_dir(),
                                  DataConfig(seq_len=64, train_windows=32, eval_windows=8))
    save_file({"windows": train.contiguous()}, tmp_path / "windows.safetensors")
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", str(HELPERS / "ddp_worker.py"),
           str(base), str(tmp_path / "windows.safetensors"), str(tmp_path / "ddp"), json.dumps({"seed0": SETTINGS})]
    result = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    assert '"world_size": 2' in result.stdout
    for seed in (0, 1):
        train_adapter(base, train, tmp_path / f"single{seed}", TrainSettings(**SETTINGS, seed=seed))

    ppl = {"base": perplexity(load_gptq_model(base), heldout, progress=False)}
    for run in ("single0", "single1", "ddp/seed0"):
        ppl[run] = merged_perplexity(base, tmp_path / run, tmp_path / "merged" / run, heldout)
    noise = abs(ppl["single0"] - ppl["single1"])
    gap = abs(ppl["ddp/seed0"] - ppl["single0"])
    print("held-out perplexity of the merged checkpoints: " + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items())
          + f"; |ddp - single| = {gap:.4g}, seed noise {noise:.4g}")
    assert ppl["base"] - ppl["single0"] > 5 * noise  # training moves it far more than the noise: teeth
    assert gap <= noise
