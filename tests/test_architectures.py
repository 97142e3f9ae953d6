"""Training and merging beyond LLaMA: Mistral, Qwen2 (q/k/v biases, an untied head), Qwen3 (q/k norms), Gemma 2
and Phi-3 (fused projections).

A few optimizer steps of an exact QA-LoRA adapter (with trained scales) on each tiny random GPTQ model, then the
file-to-file merge: transformers + GPTQModel on the merged folder must compute what the trained adapter model
computes, and every float tensor (biases, norms, embeddings, head) must pass through the merge unchanged.
"""

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from helpers.models import ARCHITECTURES, build_gptq

from peft_qalora import QALoraConfig, load_gptq_model, prepare_model_for_training
from peft_qalora.merge.files import merge_checkpoint


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_train_then_merge_equals_the_trained_model(architecture, tmp_path, tiny_spm):
    base = build_gptq(tmp_path / "base", architecture, tiny_spm)
    torch.manual_seed(0)
    model = get_peft_model(prepare_model_for_training(load_gptq_model(base), gradient_checkpointing=False),
                           QALoraConfig(r=4, merge_strategy="exact"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    report = merge_checkpoint(base, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert report["total"]["moved"] > 0  # the adapter moved zeros: the comparison below is not trivial
    model.eval()
    merged = load_gptq_model(tmp_path / "merged").eval()
    with torch.no_grad():
        trained, ours = model(input_ids=ids).logits, merged(input_ids=ids).logits
        untrained = load_gptq_model(base).eval()(input_ids=ids).logits
    diff = float((trained - ours).abs().max())
    assert diff < 1e-3 * float(trained.abs().max()), diff
    assert float((trained - untrained).abs().max()) > 100 * diff
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    floats = [k for k in before if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))]
    assert any(k.endswith("q_proj.bias") for k in floats) == (architecture == "Qwen2ForCausalLM")
    for key in floats:
        assert torch.equal(before[key], after[key]), key
