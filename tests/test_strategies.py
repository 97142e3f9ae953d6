"""Merge strategies: the straight-through integer adapter (exact) and calibrated rounding."""

import itertools

import pytest
import torch
from peft import get_peft_model
from helpers.reference import assert_layer_matches, dense_weight, naive_unpack

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.merge.calibrate import calibrate
from peft_qalora.gptq.checkpoint import read_tensors
from peft_qalora.merge.zeros import merge_zeros, output_error
from peft_qalora.merge.files import merge_checkpoint

KEYS = ("qweight", "qzeros", "scales", "g_idx")


def exact_model(folder, std=0.3):
    model = get_peft_model(load_gptq_model(folder), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 merge_strategy="exact", train_scales=False))
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "qalora_B" in name:
            torch.nn.init.normal_(p, std=std)
    return model


@pytest.mark.parametrize("act_order", [False, True])
def test_exact_forward_is_the_integer_merged_weight_and_gradients_flow(tiny_gptq_factory, act_order):
    folder = tiny_gptq_factory(2, act_order=act_order)  # 2 bits: zeros in [1, 3], so the clamp is busy
    model = exact_model(folder)
    name = "model.layers.0.mlp.down_proj"
    layer = model.base_model.model.get_submodule(name)
    t = read_tensors(folder / "model.safetensors", [f"{name}.{k}" for k in KEYS])
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in KEYS)
    A, B = layer.qalora_A["default"].weight, layer.qalora_B["default"].weight
    z = naive_unpack(qzeros, 2, scales.shape[1], along_rows=False) + 1  # (G, out)
    shift = (2.0 * (B @ A)).detach().T / scales.float()  # (G, out), steps
    k = torch.minimum(torch.maximum(torch.round(shift), z - 3.0), z - 1.0)  # z - k stays in [1, 3]
    assert (k != torch.round(shift)).any() and (k != 0).any()  # the clamp and the shift both matter here
    W = dense_weight(qweight, qzeros, scales, g_idx, 2)
    dW = (scales.float() * k)[g_idx.long()].T  # (out, in)
    x = torch.randn(3, layer.in_features)
    out = layer(x)
    torch.testing.assert_close(out.detach(), x @ (W + dW).T, rtol=2e-3, atol=2e-3)
    out.pow(2).sum().backward()
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0


def test_exact_merge_equals_the_trained_model(tiny_gptq_factory, tmp_path):
    folder = tiny_gptq_factory(4, act_order=True)
    model = exact_model(folder, std=0.05).eval()
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    report = merge_checkpoint(folder, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert report["strategy"] == "exact" and report["total"]["moved"] > 0
    with torch.no_grad():
        exported = load_gptq_model(tmp_path / "out")(x).logits  # transformers + GPTQModel
    torch.testing.assert_close(exported, trained, rtol=1e-3, atol=1e-3)


def brute_force(delta, scales, H, zeros, low, high):
    """Best integer steps per column over every combination of floor/ceil (and the clamp)."""
    G, out = delta.shape
    best = torch.empty(G, out, dtype=torch.int32)
    for o in range(out):
        t = delta[:, o] / scales[:, o]
        options = [sorted({int(v) for v in (torch.floor(t[g]), torch.ceil(t[g]))}) for g in range(G)]
        cands = []
        for combo in itertools.product(*options):
            k = torch.tensor(combo, dtype=torch.int32).clamp(zeros[:, o] - high, zeros[:, o] - low)
            cands.append((float(output_error(k[:, None], delta[:, o:o + 1], scales[:, o:o + 1], H)), k))
        best[:, o] = min(cands, key=lambda c: c[0])[1]
    return best


def test_calibrated_rounding_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    matched, total = 0, 0
    for trial in range(40):
        G, out = 4, 6
        X = torch.randn(64, G, generator=gen) @ torch.randn(G, G, generator=gen)  # correlated pooled inputs
        H = X.T @ X / 64
        scales = torch.rand(G, out, generator=gen) * 0.5 + 0.1
        delta = torch.randn(G, out, generator=gen) * 0.3
        zeros = torch.randint(1, 16, (G, out), generator=gen, dtype=torch.int32)
        nearest, _ = merge_zeros(zeros, scales, delta, 4, "nearest")
        calibrated, stats = merge_zeros(zeros, scales, delta, 4, "calibrated", hessian=H)
        err_n = output_error(zeros - nearest, delta, scales, H)
        err_c = output_error(zeros - calibrated, delta, scales, H)
        assert (err_c <= err_n + 1e-9).all()
        err_b = output_error(brute_force(delta, scales, H, zeros, 1, 15), delta, scales, H)
        matched += int((err_c <= err_b + 1e-9).sum())
        total += out
    assert matched / total > 0.8, f"calibrated matched the optimum on {matched}/{total} columns"


def test_calibrated_merge_beats_nearest_on_real_statistics(tiny_gptq):
    model = get_peft_model(load_gptq_model(tiny_gptq), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False, merge_strategy="nearest"))
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "qalora_B" in name:
            torch.nn.init.normal_(p, std=0.01)  # shifts well under half a step: nearest erases most of them
    windows = torch.randint(0, 128, (8, 32))
    hessians = calibrate(model, windows, progress=False)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    tensors = layer.base_layer
    from peft_qalora.base.load import quant_tensors

    qt = quant_tensors(tensors)
    delta = layer.group_delta("default").detach()
    H = hessians["model.layers.0.mlp.down_proj"]
    nearest, _ = merge_zeros(qt.zeros(), qt.scales, delta, 4, "nearest")
    calibrated, _ = merge_zeros(qt.zeros(), qt.scales, delta, 4, "calibrated", hessian=H)
    e_n = output_error(qt.zeros() - nearest, delta, qt.scales.float(), H).sum()
    e_c = output_error(qt.zeros() - calibrated, delta, qt.scales.float(), H).sum()
    assert e_c < 0.95 * e_n  # never worse by construction; here clearly better
    x = windows[:2]
    model.eval()
    with torch.no_grad():
        adapter = model(x).logits
    merged = model.merge_and_unload(strategy="calibrated")
    with torch.no_grad():
        assert torch.isfinite(merged(x).logits).all()
    assert adapter.shape == (2, 32, 128)


def test_trained_scales_merge_exactly(tiny_gptq_factory, tmp_path):
    folder = tiny_gptq_factory(3, act_order=True)
    model = get_peft_model(load_gptq_model(folder), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 merge_strategy="exact", train_scales=True))
    x = torch.randint(0, 128, (2, 16))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    scale_params = [p for n, p in model.named_parameters() if "qalora_scale" in n]
    assert len(scale_params) == 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in scale_params)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in scale_params:
            p.normal_(std=0.05)
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(folder, tmp_path / "adapter", tmp_path / "out", progress=False)
    name = "model.layers.1.self_attn.o_proj"
    old, new = (read_tensors(f / "model.safetensors", [f"{name}.scales"])[f"{name}.scales"] for f in (folder, tmp_path / "out"))
    c = model.base_model.model.get_submodule(name).qalora_scale["default"] * 10  # stored as c / scale_lr_ratio
    assert torch.equal(new, (old.float() * (1 + c.float())).half())
    with torch.no_grad():
        exported = load_gptq_model(tmp_path / "out")(x).logits
    torch.testing.assert_close(exported, trained, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_trained_scales_gradients_equal_dense_reference(tiny_gptq_factory, act_order):
    """Exact + trained scales: the layer's output and the gradients of A, B and the scale factors
    against autograd through the dense weight s * (1 + c) * (q - z + k), k rounded straight-through."""
    folder = tiny_gptq_factory(2, act_order=act_order)
    model = get_peft_model(load_gptq_model(folder), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 merge_strategy="exact", train_scales=True))
    name = "model.layers.0.mlp.down_proj"
    layer = model.base_model.model.get_submodule(name)
    t = read_tensors(folder / "model.safetensors", [f"{name}.{k}" for k in KEYS])
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in KEYS)
    A, B, c = layer.qalora_A["default"].weight, layer.qalora_B["default"].weight, layer.qalora_scale["default"]
    torch.manual_seed(3)
    with torch.no_grad():
        B.normal_(std=0.3)
        c.normal_(std=0.01)
    A_ref, B_ref, c_ref = (p.detach().clone().requires_grad_() for p in (A, B, c))
    q = naive_unpack(qweight, 2, g_idx.numel(), along_rows=True).float()  # (in, out)
    z = naive_unpack(qzeros, 2, scales.shape[1], along_rows=False).float() + 1  # (G, out)
    shift = (2.0 * (B_ref @ A_ref)).T / scales.float()
    rounded = shift + (torch.round(shift) - shift).detach()  # straight through the rounding
    bounded = torch.clamp(rounded.detach(), min=z - 3, max=z - 1)
    k = torch.where(bounded == rounded.detach(), rounded, bounded)  # no gradient where the clamp bites
    s_new = scales.float() * (1 + 10 * c_ref)  # the parameter is c / scale_lr_ratio
    g = g_idx.long()
    W = s_new[g] * (q - z[g] + k[g])  # (in, out)
    # the layer multiplies by s' rounded to fp16, the reference by s': errors scale with the gradient
    assert_layer_matches(layer, W, ((A, A_ref), (B, B_ref), (c, c_ref)), grad_atol=1e-3)


def test_train_scales_needs_exact():
    with pytest.raises(ValueError, match="train_scales=True needs merge_strategy='exact'"):
        QALoraConfig(train_scales=True, merge_strategy="nearest")


def test_scale_lr_ratio_speeds_the_scales_under_adam(tiny_gptq):
    x = torch.randint(0, 128, (2, 16))
    for ratio in (1.0, 10.0):
        torch.manual_seed(0)
        model = get_peft_model(load_gptq_model(tiny_gptq), QALoraConfig(r=4, merge_strategy="exact", scale_lr_ratio=ratio))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model(input_ids=x, labels=x).loss.backward()
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        clear = layer.qalora_scale["default"].grad.abs() > 1e-4  # where Adam's eps is negligible
        optimizer.step()
        c = layer.scale_factor("default").detach()
        # Adam's first step moves every parameter by lr * sign(grad), so c moves by ratio * lr
        assert clear.sum() > 10
        torch.testing.assert_close(c[clear].abs(), torch.full((int(clear.sum()),), ratio * 1e-3), rtol=1e-3, atol=0)
