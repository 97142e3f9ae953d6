"""The CPU training kernel reproduces GPTQModel's own forward and gives the right input gradient."""

import pytest
import torch

from peft_qalora import load_gptq_model
from peft_qalora.tuners.kernels import LayerCache, gptq_linear_forward
from peft_qalora.base.load import quant_tensors


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequant_matmul_matches_gptqmodel(tiny_gptq_factory, bits, act_order):
    model = load_gptq_model(tiny_gptq_factory(bits, act_order=act_order))
    layer = model.model.layers[1].mlp.down_proj  # GPTQModel's TorchLinear: the independent reference
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    ref = layer(x)
    (grad_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    ours = gptq_linear_forward(LayerCache(), quant_tensors(layer), x)
    (grad_ours,) = torch.autograd.grad(ours.pow(2).sum(), x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-4)


def test_kernel_keeps_no_float_weight_for_backward(tiny_gptq):
    layer = load_gptq_model(tiny_gptq).model.layers[0].mlp.up_proj
    x = torch.randn(4, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gptq_linear_forward(LayerCache(), quant_tensors(layer), x).sum()
    assert saved and all(not (t.is_floating_point() and t.shape == (layer.in_features, layer.out_features)) for t in saved)


def test_pooled_input_is_shared_by_layers_reading_one_tensor_and_follows_in_place_changes():
    from peft_qalora.tuners.kernels import pooled_input

    x = torch.randn(2, 3, 64)
    first = pooled_input(x, 4)
    torch.testing.assert_close(first, x.view(2, 3, 4, 16).sum(-1))  # sums of 16 consecutive inputs
    assert pooled_input(x, 4) is first  # q, k and v: pooled once
    x.mul_(2)  # same tensor, new contents: the version counter moves
    torch.testing.assert_close(pooled_input(x, 4), 2 * first)
    assert pooled_input(x[:, :2], 4).shape == (2, 2, 4)  # another view of the same memory is another input


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_unpacked_levels_equal_cached_levels_and_the_codes(tiny_gptq_factory, code_cache_setting, bits, act_order):
    from peft_qalora.tuners.kernels import code_cache_bytes

    model = load_gptq_model(tiny_gptq_factory(bits, act_order=act_order))
    tensors = quant_tensors(model.model.layers[1].mlp.down_proj)
    order = torch.argsort(tensors.g_idx.long(), stable=True)
    want = tensors.codes()[order].view(tensors.n_groups, tensors.group_size, -1) - tensors.zeros()[:, None, :]
    code_cache_setting("all")
    cached = LayerCache().get(tensors)
    assert cached._levels is None  # decided at the kernel's first use, not before
    assert cached.source is cached._levels and cached._levels is not None and code_cache_bytes() >= cached._levels.nbytes
    code_cache_setting("none")
    packed = LayerCache().get(tensors)
    assert packed._levels is None and callable(packed.source)
    assert torch.equal(cached.levels.long(), want.long()) and torch.equal(packed.levels.long(), want.long())
    assert cached.get(tensors)._levels is None  # the setting changed: the cached layer gave its bytes back


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_kernel_without_code_cache_is_bit_identical(tiny_gptq_factory, code_cache_setting, bits, act_order):
    """Forward, input gradient, scales and delta gradients: the same integers go into the same
    arithmetic, so cache on and off agree bit for bit (torch.equal, no tolerance)."""
    model = load_gptq_model(tiny_gptq_factory(bits, act_order=act_order))
    tensors = quant_tensors(model.model.layers[1].mlp.down_proj)
    x0 = torch.randn(3, 7, tensors.in_features)
    S0 = tensors.scales.float() * (1 + 0.01 * torch.randn(tensors.scales.shape))
    D0 = 0.01 * torch.randn(tensors.scales.shape)
    grad_y = torch.randn(3, 7, tensors.out_features)
    results = {}
    for setting in ("all", "none", "all"):
        code_cache_setting(setting)
        x, S, D = (t.clone().requires_grad_() for t in (x0, S0, D0))
        for fp16_weight in (False, True):
            y = gptq_linear_forward(LayerCache(), tensors, x, scales=S, delta=D, fp16_weight=fp16_weight)
            y.backward(grad_y)
            got = [y.detach(), x.grad, S.grad, D.grad]
            results.setdefault(fp16_weight, []).append(got)
            for t in (x, S, D):
                t.grad = None
    for runs in results.values():
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_code_cache_budget_caches_layers_in_call_order(tiny_gptq, code_cache_setting):
    from peft_qalora.tuners.kernels import code_cache, code_cache_bytes

    import gc

    gc.collect()  # layer caches of earlier tests' models would count against the budget
    model = load_gptq_model(tiny_gptq)
    layers = [m for m in model.modules() if hasattr(m, "qweight")]
    sizes = [m.in_features * m.out_features for m in layers]  # int8 levels at 4 bits
    budget = sum(sizes[:3])
    assert code_cache_setting(f"{budget}B") == budget == code_cache()
    caches = [LayerCache().get(quant_tensors(m)) for m in layers]
    kept = [isinstance(c.source, torch.Tensor) for c in caches]
    assert kept[:3] == [True] * 3 and not all(kept) and code_cache_bytes() <= budget
    assert code_cache_bytes() == sum(s for s, k in zip(sizes, kept) if k)
    del caches
    assert code_cache_bytes() == 0  # a layer cache that is gone holds no budget


def test_code_cache_setting_from_the_environment_and_bad_values(monkeypatch, code_cache_setting):
    from peft_qalora.tuners.kernels import CODE_CACHE_ENV, code_cache, parse_code_cache

    monkeypatch.setenv(CODE_CACHE_ENV, "none")
    assert code_cache_setting(None) == "none" == code_cache()
    monkeypatch.setenv(CODE_CACHE_ENV, "1.5GiB")
    assert code_cache_setting(None) == int(1.5 * 2**30)
    monkeypatch.delenv(CODE_CACHE_ENV)
    assert code_cache_setting(None) == "all"
    assert parse_code_cache("8GB") == 8 * 10**9 and parse_code_cache(0) == "none" and parse_code_cache(" ALL ") == "all"
    for bad in ("some", "-1", "8 GX", True, -5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="code_cache="):
            parse_code_cache(bad)


def test_kernel_without_code_cache_keeps_no_levels_for_backward(tiny_gptq, code_cache_setting):
    layer = load_gptq_model(tiny_gptq).model.layers[0].mlp.up_proj
    code_cache_setting("none")
    cache = LayerCache()
    x = torch.randn(4, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = gptq_linear_forward(cache, quant_tensors(layer), x)
    assert cache._levels is None
    assert all(t.numel() < layer.in_features * layer.out_features for t in saved)
    y.sum().backward()
    assert x.grad is not None
