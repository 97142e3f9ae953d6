"""The CPU training kernel reproduces GPTQModel's own forward and gives the right input gradient."""

import pytest
import torch

from peft_qalora import load_gptq_model
from peft_qalora.kernels import LayerCache, gptq_linear_forward
from peft_qalora.quantized import quant_tensors


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
    from peft_qalora.kernels import pooled_input

    x = torch.randn(2, 3, 64)
    first = pooled_input(x, 4)
    torch.testing.assert_close(first, x.view(2, 3, 4, 16).sum(-1))  # sums of 16 consecutive inputs
    assert pooled_input(x, 4) is first  # q, k and v: pooled once
    x.mul_(2)  # same tensor, new contents: the version counter moves
    torch.testing.assert_close(pooled_input(x, 4), 2 * first)
    assert pooled_input(x[:, :2], 4).shape == (2, 2, 4)  # another view of the same memory is another input
