"""A few Trainer / SFTTrainer steps lower the loss and change nothing but the adapter."""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_qalora import QALoraConfig, load_gptq_model, prepare_model_for_training

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def fixed_batch(n=4, seq=48):
    ids = torch.tensor([ord(c) % 128 for c in TEXT])[: n * seq].view(n, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def snapshot(model):
    quant = {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return quant, params


def loss_on(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def check_only_adapter_changed(model, before):
    quant, params = before
    for name, buf in model.named_buffers():
        if name in quant:
            assert torch.equal(buf, quant[name]), f"quantized buffer {name} changed"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), params[n])}
    assert changed and all(".qalora_" in n for n in changed), changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_steps_lower_loss_and_touch_only_the_adapter(tiny_gptq, tmp_path, dtype):
    model = prepare_model_for_training(load_gptq_model(tiny_gptq, dtype=dtype))
    model = get_peft_model(model, QALoraConfig(r=8, lora_alpha=16))
    batch = fixed_batch()
    before_loss, before = loss_on(model, batch), snapshot(model)
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    args = TrainingArguments(tmp_path, max_steps=8, learning_rate=3e-2, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", logging_steps=100, use_cpu=True,
                             bf16=dtype is torch.bfloat16)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert loss_on(model, batch) < before_loss - 0.05
    check_only_adapter_changed(model, before)


@pytest.mark.parametrize("variant", [{}, {"scales_only": True}, {"use_dora": True}], ids=["qalora", "scales", "dora"])
def test_sft_trainer_steps_lower_loss(tiny_gptq, tmp_path, variant):
    from trl import SFTConfig, SFTTrainer

    from helpers.tiny import tiny_tokenizer

    model = prepare_model_for_training(load_gptq_model(tiny_gptq))
    batch = fixed_batch()
    data = Dataset.from_dict({"text": [TEXT[i * 48:(i + 1) * 48] for i in range(4)]})
    args = SFTConfig(tmp_path, max_steps=8, learning_rate=3e-2, per_device_train_batch_size=4, report_to=[],
                     save_strategy="no", logging_steps=100, use_cpu=True, dataset_text_field="text", max_length=64)
    tokenizer = tiny_tokenizer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=QALoraConfig(r=8, lora_alpha=16, **variant))
    before_loss, before = loss_on(trainer.model, batch), snapshot(trainer.model)
    trainer.train()
    assert type(trainer.model.base_model).__name__ == "QALoraModel"
    assert loss_on(trainer.model, batch) < before_loss - 0.05
    check_only_adapter_changed(trainer.model, before)


def test_inference_only_kernel_is_refused(tiny_gptq):
    model = load_gptq_model(tiny_gptq)
    layer = model.model.layers[0].self_attn.q_proj
    type(layer).SUPPORTS_TRAINING = False
    try:
        with pytest.raises(ValueError, match="inference-only and cannot run backward.*backend='gptq_torch'"):
            prepare_model_for_training(model)
    finally:
        type(layer).SUPPORTS_TRAINING = True
