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
