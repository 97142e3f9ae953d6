"""QA-LoRA -> standard peft LoRA: the LoRA loaded by peft itself (onto the same GPTQ base) computes what
the QA-LoRA adapter computes, for contiguous and act-order bases and for peft's own use_qalora adapters."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.evaluate import logits_on
from peft_qalora.exports.lora import export_lora, standard_lora_A


def test_standard_A_repeats_each_pooled_column_by_g_idx():
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (r=2, groups=2)
    g_idx = torch.tensor([1, 0, 0, 1])  # act-order: inputs 1, 2 in group 0
    assert torch.equal(standard_lora_A(A, g_idx, 1), torch.tensor([[2.0, 1.0, 1.0, 2.0], [4.0, 3.0, 3.0, 4.0]]))
    assert torch.equal(standard_lora_A(A[:, :1], torch.tensor([0, 1, 1, 0]), 2), torch.ones(2, 4) * A[:, :1])


def _qalora_adapter(folder, out, **kw):
    torch.manual_seed(0)
    config = QALoraConfig(**(dict(r=4, lora_alpha=8, init_lora_weights=False, merge_strategy="nearest") | kw))
    model = get_peft_model(load_gptq_model(folder), config).eval()
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("act_order,group_size", [(False, None), (True, None), (False, 64)])
def test_peft_loads_the_lora_and_agrees(tiny_gptq_factory, tmp_path, act_order, group_size):
    base = tiny_gptq_factory(4, act_order=act_order)
    qalora = _qalora_adapter(base, tmp_path / "qalora", group_size=group_size)
    ids = torch.randint(0, 128, (2, 12))
    expected = logits_on(qalora, ids)
    summary = export_lora(tmp_path / "qalora", tmp_path / "lora", base)
    assert summary["A_parameters_after"] == summary["A_parameters_before"] * (group_size or 32)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    lora = PeftModel.from_pretrained(load_gptq_model(base), tmp_path / "lora").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    assert logits_on(lora, ids).sub(logits_on(load_gptq_model(base), ids)).abs().max() > 1e-2  # it does something
    torch.testing.assert_close(logits_on(lora, ids), expected, rtol=1e-4, atol=1e-4)


def test_peft_use_qalora_adapter_converts(tiny_gptq, tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_qalora=True, qalora_group_size=32,
                        init_lora_weights=False)
    model = get_peft_model(load_gptq_model(tiny_gptq), config).eval()
    ids = torch.randint(0, 128, (1, 12))
    expected = logits_on(model, ids)
    model.save_pretrained(tmp_path / "peft-qalora")
    export_lora(tmp_path / "peft-qalora", tmp_path / "lora", tiny_gptq)
    lora = PeftModel.from_pretrained(load_gptq_model(tiny_gptq), tmp_path / "lora").eval()
    assert not json.loads((tmp_path / "lora" / "adapter_config.json").read_text()).get("use_qalora")
    torch.testing.assert_close(logits_on(lora, ids), expected, rtol=1e-4, atol=1e-4)


def test_exact_and_trained_scales_are_refused(tiny_gptq, tmp_path):
    _qalora_adapter(tiny_gptq, tmp_path / "scales", merge_strategy="exact")
    with pytest.raises(ValueError, match="trained the fp16 scales"):
        export_lora(tmp_path / "scales", tmp_path / "out", tiny_gptq)
    _qalora_adapter(tiny_gptq, tmp_path / "exact", merge_strategy="exact", train_scales=False)
    with pytest.raises(ValueError, match="merge_strategy='exact'"):
        export_lora(tmp_path / "exact", tmp_path / "out", tiny_gptq)
    assert not (tmp_path / "out").exists()


def test_lora_tensors_are_plain_peft_names(tiny_gptq, tmp_path):
    _qalora_adapter(tiny_gptq, tmp_path / "qalora")
    export_lora(tmp_path / "qalora", tmp_path / "lora", tiny_gptq)
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert a.shape == (4, 128) and len(tensors) == 28
