"""The training path is device agnostic: every tensor follows the layer's codes, nothing assumes the CPU.

Without a GPU, three tricks check it on the CPU:
- a base whose codes sit on `meta` (g_idx left on the CPU, as GPTQModel leaves it beside GPU codes): every
  tensor an adapter adds must be made on `meta` too;
- a CPU model under `torch.device("meta")` as the default device: a tensor made without `device=` lands on
  `meta`, so it shows up in the model or breaks the forward, backward or merge that mixes it with CPU tensors;
- `.cpu()` / `.numpy()` called from peft-qalora during a training step, recorded and refused.
A static scan of the tuners and the merge math completes them for the paths no test runs.

The tests taking `test_device` run on $PEFT_QALORA_TEST_DEVICE (default cpu; benchmarks/gpu_check.sh sets
cuda): a training step on the device equals the same step on the CPU kernel, and the in-memory merge on the device
writes the zeros and scales the CPU writes. On the CPU the "device" run goes through the path a GPU takes (the
loader's kernel plus the adapter, `cpu_training_kernel` off), so the comparison means something there too.
"""

from __future__ import annotations

import ast
import sys
from itertools import chain
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_qalora
from peft_qalora import QALoraConfig, QAVeraConfig, load_gptq_model
from peft_qalora.base.load import is_gptq_linear
from peft_qalora.tuners.qalora.layer import QALoraLinear

SRC = Path(peft_qalora.__file__).resolve().parent
VARIANTS = {
    "plain": dict(merge_strategy="nearest"),
    "calibrated": dict(merge_strategy="calibrated"),
    "exact": dict(merge_strategy="exact", train_scales=False),
    "exact_scales": dict(merge_strategy="exact", train_scales=True),
    "scales_only": dict(scales_only=True),
    "dora": dict(use_dora=True, merge_strategy="exact"),
    "vera": dict(method="vera", merge_strategy="nearest"),
    "vera_scales": dict(method="vera", merge_strategy="exact", train_scales=True),
}
EXACT = ("exact", "exact_scales", "scales_only", "dora", "vera_scales")


def adapter_config(kind: str):
    options = dict(VARIANTS[kind])
    if options.pop("method", None) == "vera":
        return QAVeraConfig(r=8, init_weights=False, **options)
    return QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)


def adapted(folder, kind: str):
    """The tiny model with a seeded, non-identity adapter of `kind`, every trained tensor away from its start."""
    torch.manual_seed(0)
    model = get_peft_model(load_gptq_model(folder), adapter_config(kind))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qalora_B" in name:
                p.normal_(std=0.3)
            elif "qavera_lambda_b" in name:
                p.normal_(std=0.05)
            elif "qavera_lambda_d" in name:
                p.normal_()
            elif "qalora_scale" in name:
                p.normal_(std=0.01)
            elif "qalora_magnitude" in name:
                p.normal_(std=0.02)
    return model


def tensors_of(model):
    return chain(model.named_parameters(), model.named_buffers())


def train_step(model, ids):
    """Loss and every trainable gradient of one forward and backward, on the CPU."""
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach().cpu(), grads


# --- CPU-only tricks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "exact_scales", "scales_only", "dora", "vera_scales"])
def test_new_tensors_are_made_on_the_codes_device(tiny_gptq_factory, kind):
    model = load_gptq_model(tiny_gptq_factory(4, act_order=True))
    g_idx = {n: m.g_idx for n, m in model.named_modules() if is_gptq_linear(m)}
    model.to("meta")
    for name, idx in g_idx.items():
        model.get_submodule(name).g_idx = idx  # GPTQModel may keep g_idx on the CPU beside codes on a GPU
    peft_model = get_peft_model(model, adapter_config(kind))
    elsewhere = [n for n, t in tensors_of(peft_model) if not n.endswith("g_idx") and t.device.type != "meta"]
    assert not elsewhere, f"made off the codes' device: {elsewhere[:6]}"
    layers = [m for m in peft_model.modules() if isinstance(m, QALoraLinear)]
    assert layers and all(m.pool.order.device.type == "meta" for m in layers)


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_no_tensor_is_made_on_the_default_device(tiny_gptq_factory, kind):
    """Under a `meta` default device, adapter creation, a training step, calibration and the in-memory merge of
    a CPU model stay on the CPU: anything made without `device=` would be `meta` and show here."""
    from peft_qalora.merge.calibrate import calibrate

    folder = tiny_gptq_factory(4, act_order=True)
    ids = torch.randint(0, 128, (2, 9))
    model = load_gptq_model(folder)
    with torch.device("meta"):
        peft_model = get_peft_model(model, adapter_config(kind))
        on_meta = [n for n, t in tensors_of(peft_model) if t.device.type != "cpu"]
        assert not on_meta, f"made on the default device: {on_meta[:6]}"
        loss, grads = train_step(peft_model, ids)
        assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads.values())
        if kind == "calibrated":
            calibrate(peft_model, ids, progress=False)
        merged = peft_model.merge_and_unload()
        on_meta = [n for n, t in tensors_of(merged) if t.device.type != "cpu"]
        assert not on_meta, f"merged onto the default device: {on_meta[:6]}"
        merged.eval()
        with torch.no_grad():
            assert merged(input_ids=ids).logits.device.type == "cpu"


@pytest.mark.parametrize("kind", ["plain", "exact_scales", "dora", "vera"])
def test_training_step_never_copies_to_the_cpu(tiny_gptq_factory, monkeypatch, kind):
    """No `.cpu()` or `.numpy()` from peft-qalora's own code while a training step runs (on a GPU each is a copy
    and a sync; feeding the result back into the math breaks the step)."""
    model = adapted(tiny_gptq_factory(4, act_order=True), kind)
    ids = torch.randint(0, 128, (2, 9))
    calls = []

    def recording(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if Path(caller).resolve().is_relative_to(SRC):
                calls.append(f"{name}() from {Path(caller).relative_to(SRC)}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return method

    for name in ("cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert not calls, calls


def test_kernel_permutation_follows_the_codes(tiny_gptq_factory):
    """The kernel's act-order permutation is put on the codes' device even where g_idx sits on the CPU."""
    from peft_qalora.base.load import quant_tensors
    from peft_qalora.tuners.kernels import LayerCache

    model = load_gptq_model(tiny_gptq_factory(4, act_order=True))
    tensors = quant_tensors(model.get_submodule("model.layers.0.mlp.down_proj"))
    tensors.qweight = tensors.qweight.to("meta")  # the codes elsewhere; zeros, scales and g_idx read on the CPU
    assert LayerCache().get(tensors).order.device.type == "meta"


@pytest.mark.parametrize("cuda", [False, True])
def test_trainer_runs_on_the_gpu_when_there_is_one(tmp_path, monkeypatch, cuda):
    from types import SimpleNamespace

    from peft_qalora.training import recipe
    from peft_qalora.training.recipe import TrainSettings, trainer_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    # the arguments as given (TrainingArguments itself would look for the GPU this machine may lack)
    monkeypatch.setattr(recipe, "TrainingArguments", lambda **kwargs: SimpleNamespace(world_size=1, **kwargs))
    assert trainer_arguments(TrainSettings(steps=1), tmp_path / "ckpt").use_cpu is (not cuda)
    forced = TrainSettings(steps=1, extra={"use_cpu": True})  # the user's word wins
    assert trainer_arguments(forced, tmp_path / "ckpt").use_cpu is True


FACTORIES = {"zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn", "randint", "randperm", "tensor",
             "linspace", "as_tensor"}
SCANNED = sorted((SRC / "tuners").rglob("*.py")) + [SRC / "merge" / f for f in ("zeros.py", "calibrate.py",
                                                                                 "projections.py")]


def device_assumptions(path: Path, root: Path = SRC) -> list[str]:
    """`torch.<factory>(...)` without `device=`, and `.cpu()` / `.numpy()` calls, as file:line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func, where = node.func, f"{path.relative_to(root)}:{node.lineno}"
        is_torch = isinstance(func.value, ast.Name) and func.value.id == "torch"
        if is_torch and func.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords):
            found.append((node.lineno, f"{where} torch.{func.attr} without device="))
        if func.attr in ("cpu", "numpy") and not node.args:
            found.append((node.lineno, f"{where} .{func.attr}()"))
    return [text for _, text in sorted(found)]


def test_tuners_and_merge_math_name_a_device_for_every_tensor_they_make():
    assert len(SCANNED) > 8
    found = [f for path in SCANNED for f in device_assumptions(path)]
    assert not found, found


def test_the_scan_sees_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\na = torch.zeros(3)\nb = torch.ones(3, device=a.device)\nc = a.cpu()\n"
                      "d = torch.arange(2).to(a)\ne = a.numpy(force=True)\n")
    assert device_assumptions(sample, tmp_path) == ["sample.py:2 torch.zeros without device=", "sample.py:4 .cpu()",
                                                    "sample.py:5 torch.arange without device=", "sample.py:6 .numpy()"]


# --- on $PEFT_QALORA_TEST_DEVICE ---------------------------------------------------------------------------


def test_device_layer_equals_dense_reference(tiny_gptq_factory, test_device):
    """One act-order layer on the device against a dense float weight built on the CPU from the files."""
    from helpers.reference import dense_delta, dense_weight

    from peft_qalora.gptq.checkpoint import read_tensors

    folder = tiny_gptq_factory(4, act_order=True)
    name = "model.layers.1.mlp.down_proj"
    layer = adapted(folder, "plain").to(test_device).base_model.model.get_submodule(name)
    t = read_tensors(folder / "model.safetensors", [f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")])
    W = dense_weight(*(t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), 4)
    A, B = layer.qalora_A["default"].weight, layer.qalora_B["default"].weight
    assert A.device.type == test_device.type and layer.pool.order.device.type == test_device.type
    A_ref, B_ref = (p.detach().cpu().clone().requires_grad_() for p in (A, B))
    x = torch.randn(3, 5, layer.in_features)
    grad_y = torch.randn(3, 5, layer.out_features)
    x_dev = x.detach().clone().to(test_device).requires_grad_()
    got = layer(x_dev)
    got.backward(grad_y.to(test_device))
    x_ref = x.detach().clone().requires_grad_()
    want = x_ref @ (W + dense_delta(A_ref, B_ref, 2.0, t[f"{name}.g_idx"])).T
    want.backward(grad_y)
    torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=2e-3, atol=2e-3)
    for got_grad, ref in ((x_dev.grad, x_ref.grad), (A.grad, A_ref.grad), (B.grad, B_ref.grad)):
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(got_grad.cpu(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", ["plain", "exact", "exact_scales", "scales_only", "dora", "vera", "vera_scales"])
def test_device_training_step_equals_cpu_kernel(tiny_gptq_factory, test_device, monkeypatch, kind):
    """Loss and every gradient of a step on the device (as a GPU runs it) equal those of the CPU training kernel,
    the path the dense-reference tests pin; the model is moved after a CPU step, so every cache must follow."""
    model = adapted(tiny_gptq_factory(4, act_order=True), kind)
    ids = torch.randint(0, 128, (2, 9))
    want_loss, want = train_step(model, ids)
    monkeypatch.setattr(QALoraLinear, "cpu_training_kernel", False)
    model.to(test_device)
    loss, grads = train_step(model, ids.to(test_device))
    torch.testing.assert_close(loss, want_loss, rtol=2e-3, atol=2e-3)
    assert grads.keys() == want.keys()
    moving = [name for name, grad in want.items() if grad.abs().max() > 0]  # all shifts clamped: no gradient
    assert len(moving) > len(want) // 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], rtol=2e-3, atol=3e-3 * float(want[name].abs().max()), msg=name)


@pytest.mark.parametrize("kind", ["plain", "calibrated", "exact_scales", "dora", "vera_scales"])
def test_device_in_memory_merge_writes_what_the_cpu_writes(tiny_gptq_factory, test_device, kind):
    """merge_and_unload on the device: the zeros and scales of the same merge on the CPU, and for exact adapters
    the model it trained."""
    from peft_qalora.merge.calibrate import calibrate

    folder = tiny_gptq_factory(4, act_order=True)
    ids = torch.randint(0, 128, (2, 12))
    merged = {}
    for device in (torch.device("cpu"), test_device):
        model = adapted(folder, kind).to(device).eval()
        with torch.no_grad():
            trained = model(input_ids=ids.to(device)).logits
        if kind == "calibrated":
            calibrate(model, ids, progress=False)
        base = model.merge_and_unload()
        # (GPTQModel may move g_idx to the CPU beside GPU codes)
        assert {t.device.type for n, t in tensors_of(base) if not n.endswith("g_idx")} == {device.type}
        with torch.no_grad():
            logits = base(input_ids=ids.to(device)).logits
        if kind in EXACT:
            torch.testing.assert_close(logits.cpu(), trained.cpu(), rtol=2e-3, atol=2e-3)
        merged[device.type] = {n: t.cpu() for n, t in base.named_buffers() if n.endswith(("qzeros", "scales"))}
    want, got = merged["cpu"], merged[test_device.type]
    assert got.keys() == want.keys() and any(k.endswith("qzeros") for k in got)
    for name in want:
        if name.endswith("qzeros"):  # a shift on a rounding tie may round the other way on another device
            assert (got[name] != want[name]).float().mean() < 0.01, name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=0, msg=name)
