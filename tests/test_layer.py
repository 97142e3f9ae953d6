"""QALoraLinear against a dense float reference built independently from the checkpoint tensors."""

import pytest
import torch
from peft import get_peft_model
from helpers.reference import dense_delta, dense_weight

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.gptq.checkpoint import read_tensors


def adapted(folder, **config):
    model = load_gptq_model(folder)
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, merge_strategy="nearest") | config
    return get_peft_model(model, QALoraConfig(**config))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_pooled_forward_equals_dense_reference(tiny_gptq_factory, bits, act_order):
    folder = tiny_gptq_factory(bits, act_order=act_order)
    peft_model = adapted(folder)
    name = "model.layers.0.mlp.down_proj"  # in 128 = 4 groups of 32
    layer = peft_model.base_model.model.get_submodule(name)
    t = read_tensors(folder / "model.safetensors", [f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")])
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    if act_order:
        assert not torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // 32)
    W = dense_weight(qweight, qzeros, scales, g_idx, bits)
    A, B = layer.qalora_A["default"].weight.detach(), layer.qalora_B["default"].weight.detach()
    dW = dense_delta(A, B, 2.0, g_idx)
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
    want = x @ (W + dW).T
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert (dW.abs().max() > 1e-3) and (x @ dW.T).abs().max() > 1e-2  # the adapter is not a no-op


def test_coarser_pooling_group_equals_dense_reference(tiny_gptq_factory):
    folder = tiny_gptq_factory(4, act_order=True)
    peft_model = adapted(folder, group_size=64)
    name = "model.layers.1.mlp.down_proj"
    layer = peft_model.base_model.model.get_submodule(name)
    assert layer.qalora_A["default"].weight.shape == (4, 2)  # 128 inputs / 64
    t = read_tensors(folder / "model.safetensors")
    W = dense_weight(*(t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), 4)
    A, B = layer.qalora_A["default"].weight.detach(), layer.qalora_B["default"].weight.detach()
    dW = dense_delta(A, B, 2.0, t[f"{name}.g_idx"], factor=2)
    x = torch.randn(4, layer.in_features)
    torch.testing.assert_close(layer(x).detach(), x @ (W + dW).T, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("code_cache", ["all", "none"])
def test_training_forward_and_gradients_equal_dense_reference(tiny_gptq_factory, code_cache_setting, bits, act_order,
                                                              group_size, code_cache):
    """With gradients on, base and adapter run as one weight (kernels.py); autograd through a dense
    float weight built from the file is the reference for the output and every gradient, with the
    int8 code cache and without it (codes unpacked at forward and backward)."""
    code_cache_setting(code_cache)
    folder = tiny_gptq_factory(bits, act_order=act_order)
    name = "model.layers.1.mlp.down_proj"
    layer = adapted(folder, group_size=group_size).base_model.model.get_submodule(name)
    t = read_tensors(folder / "model.safetensors", [f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")])
    W = dense_weight(*(t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), bits)
    A, B = layer.qalora_A["default"].weight, layer.qalora_B["default"].weight
    A_ref, B_ref = (p.detach().clone().requires_grad_() for p in (A, B))
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_y = torch.randn(3, 5, layer.out_features)
    got = layer(x)
    got.backward(grad_y)
    want = x_ref @ (W + dense_delta(A_ref, B_ref, 2.0, t[f"{name}.g_idx"], factor=(group_size or 32) // 32)).T
    want.backward(grad_y)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=2e-3, atol=2e-3)
    for got, ref in ((x.grad, x_ref.grad), (A.grad, A_ref.grad), (B.grad, B_ref.grad)):
        assert ref.abs().max() > 1e-3  # every gradient is exercised
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


def test_trainable_parameters_by_formula(tiny_gptq):
    peft_model = adapted(tiny_gptq, r=8)
    expected = 0
    for _, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "qalora_A"):
            expected += 8 * (module.in_features // 32 + module.out_features)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == expected == 2 * (8 * (2 + 64) * 2 + 8 * (2 + 32) * 2 + 8 * (2 + 128) * 2 + 8 * (4 + 64))


def test_default_init_is_identity_and_rslora_scaling(tiny_gptq):
    model = load_gptq_model(tiny_gptq)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        base = model(x).logits
    peft_model = get_peft_model(model, QALoraConfig(r=4, lora_alpha=8, use_rslora=True, merge_strategy="nearest"))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 2)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, base)


def test_dropout_only_in_training(tiny_gptq):
    peft_model = adapted(tiny_gptq, lora_dropout=0.5)
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, layer.in_features)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_group_size_not_a_multiple_is_refused(tiny_gptq):
    with pytest.raises(ValueError, match="group_size=48 is not a whole multiple of the checkpoint's quantization"):
        adapted(tiny_gptq, group_size=48)
    with pytest.raises(ValueError, match="group_size=16 is not a whole multiple"):
        adapted(tiny_gptq, group_size=16)


def test_group_size_not_dividing_in_features_is_refused(tiny_gptq):
    with pytest.raises(ValueError, match="group_size=96 does not divide in_features=64"):
        adapted(tiny_gptq, group_size=96)


def test_target_not_quantized_is_refused(tiny_gptq):
    with pytest.raises(ValueError, match="target lm_head is a Linear, not a GPTQ quantized linear"):
        adapted(tiny_gptq, target_modules=["q_proj", "lm_head"])


def test_unknown_target_name_is_refused(tiny_gptq):
    with pytest.raises(ValueError, match=r"target_modules \['qproj'\] match no module.*'q_proj'"):
        adapted(tiny_gptq, target_modules=["qproj"])


@pytest.mark.parametrize("bad", [dict(r=0), dict(lora_dropout=1.5), dict(bias="all"), dict(merge_strategy="floor")])
def test_bad_config_values(bad):
    with pytest.raises(ValueError, match="QALoraConfig"):
        QALoraConfig(**bad)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("kind", ["plain", "exact", "exact_scales"])
def test_code_cache_off_or_on_budget_trains_bit_identically(tiny_gptq_factory, code_cache_setting, bits, act_order, kind):
    """The whole model, loss and every gradient (A, B, trained scales, the input embeddings'), with the code
    cache on, off, and on a budget that holds some layers: bit for bit the same (torch.equal). Same
    integer levels into the same float arithmetic, so no tolerance is needed."""
    from peft_qalora.tuners.kernels import code_cache_bytes

    folder = tiny_gptq_factory(bits, act_order=act_order)
    config = {"plain": dict(merge_strategy="nearest"), "exact": dict(merge_strategy="exact", train_scales=False),
              "exact_scales": dict(merge_strategy="exact", train_scales=True)}[kind]
    ids = torch.randint(0, 128, (2, 9))
    runs = {}
    for setting in ("all", "none", 40_000, "all"):
        code_cache_setting(setting)
        torch.manual_seed(0)
        model = adapted(folder, **config)
        model.train()
        for name, p in model.named_parameters():
            if "qalora_scale" in name:
                with torch.no_grad():
                    p.normal_(0, 0.01)  # trained scales away from their start
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        held = code_cache_bytes()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g.abs().max() > 0 for g in grads.values())
        assert any("qalora_scale" in n for n in grads) == (kind == "exact_scales")
        runs[str(setting)] = (loss.detach(), grads, held)
        del model, loss
    ref_loss, ref_grads, held_all = runs["all"]
    assert held_all > 0 and runs["none"][2] == 0 and 0 < runs["40000"][2] <= 40_000
    for setting, (loss, grads, _) in runs.items():
        assert torch.equal(loss, ref_loss), setting
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), (setting, name)
