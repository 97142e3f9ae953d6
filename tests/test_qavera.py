"""QA-VeRA on GPTQ: a peft method of its own, against a dense float reference built independently from the
checkpoint tensors and peft's own VeRA initialisation, merged exactly (in memory and file to file), saved and
reloaded with and without the projections, trained with Trainer and the CLI."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file, save_file
from test_variants import NAME, unpacked

from peft_qalora import QAVeraConfig, load_gptq_model, prepare_model_for_training
from peft_qalora.merge.adapters import read_adapter
from peft_qalora.gptq.checkpoint import read_tensors
from peft_qalora.merge.files import merge_checkpoint
from peft_qalora.merge.projections import shared_projections
from peft_qalora.base.load import quant_tensors

OUTS = (64, 32, 32, 64, 128, 128, 64)  # q, k, v, o, gate, up, down of the tiny LLaMA; 2 decoder layers


def model_with(folder, **config):
    config = dict(r=8) | config
    return get_peft_model(load_gptq_model(folder), QAVeraConfig(**config))


def randomize(model, seed=3, std_b=0.05, std_c=0.0):
    """A non-identity adapter: d ~ N(0, 1), b ~ N(0, std_b), trained scales ~ N(0, std_c)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qavera_lambda_d" in name:
                p.normal_()
            elif "qavera_lambda_b" in name:
                p.normal_(std=std_b)
            elif "qalora_scale" in name:
                p.normal_(std=std_c)


def peft_vera_projections(key, r, n_pool, out):
    """A (r, n_pool), B (out, r) as peft's VeraModel._init_vera_A_vera_B makes them, with its own function."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return _kaiming_init((r, n_pool), generator=generator), _kaiming_init((out, r), generator=generator)


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


# --- registration, projections, parameters ---------------------------------------------------------------


def test_registered_with_peft(tmp_path):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import PeftType

    assert PeftType("QAVERA") is PeftType.QAVERA and PeftType("QALORA") is PeftType.QALORA
    assert PEFT_TYPE_TO_CONFIG_MAPPING["QAVERA"] is QAVeraConfig and PEFT_TYPE_TO_PREFIX_MAPPING["QAVERA"] == "qavera_"
    QAVeraConfig(r=32, projection_prng_key=7).save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, QAVeraConfig) and (again.r, again.projection_prng_key) == (32, 7)


def test_projections_are_peft_veras_for_the_same_key_and_shape():
    A, B = shared_projections(5, 16, 18, 1536)
    A_ref, B_ref = peft_vera_projections(5, 16, 18, 1536)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)
    assert not torch.equal(shared_projections(6, 16, 18, 1536)[0], A)


def test_trainable_parameters_are_r_plus_out_per_layer_and_projections_are_frozen(tiny_gptq):
    model = model_with(tiny_gptq, r=8)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * sum(8 + out for out in OUTS) == 1136  # by hand: r + out per layer, 14 layers
    names = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"qavera_lambda_d", "qavera_lambda_b"}
    tuner = model.base_model
    # projections: buffers, shaped by the widest layer (down_proj: 128 inputs = 4 groups; gate/up: 128 outputs)
    assert tuner.qavera_A["default"].shape == (8, 4) and tuner.qavera_B["default"].shape == (128, 8)
    assert not any("qavera_A" in n or "qavera_B" in n for n, _ in model.named_parameters())
    assert model.peft_config["default"].projection_shape == [4, 128]
    with_scales = model_with(tiny_gptq, r=8, train_scales=True).get_nb_trainable_parameters()[0]
    assert with_scales - trainable == 2 * (2 * 64 + 2 * 32 + 2 * 32 + 2 * 64 + 2 * 128 * 2 + 4 * 64)  # groups x out


def test_starts_as_the_identity(tiny_gptq):
    base = load_gptq_model(tiny_gptq)
    x = torch.randint(0, 128, (2, 12))
    want = logits(base, x)
    model = get_peft_model(base, QAVeraConfig(r=16))  # b = 0, d = 0.1
    layer = model.base_model.model.get_submodule(NAME)
    assert torch.equal(layer.qavera_lambda_b["default"], torch.zeros(64))
    # d passes through the base layer's fp16 on creation (peft's _move_adapter_to_device_of_base_layer), as LoRA's A
    assert torch.equal(layer.qavera_lambda_d["default"], torch.full((16,), 0.1).half().float())
    torch.testing.assert_close(logits(model, x), want, rtol=0, atol=0)


# --- the math, against a dense reference ------------------------------------------------------------------


def dense_vera(q, z, s, g, A, B, d, b, exact, bits):
    """(in, out) adapted weight: delta = ((b * B) (d * A)).T per group; exact: integer shifts k = round(delta / s)
    straight through, clamped so the merged zeros stay in [1, 2^b - 1] (no gradient where the clamp bites)."""
    delta = ((b[:, None] * B) @ (d[:, None] * A)).T  # (G, out)
    if not exact:
        return s[g] * (q - z[g]) + delta[g]
    shift = delta / s
    rounded = shift + (torch.round(shift) - shift).detach()
    bounded = torch.clamp(rounded.detach(), min=z - (2**bits - 1), max=z - 1)
    k = torch.where(bounded == rounded.detach(), rounded, bounded)
    return s[g] * (q - z[g] + k[g])


@pytest.mark.parametrize("bits,act_order,strategy", [(2, False, "exact"), (3, True, "exact"), (4, True, "exact"),
                                                      (8, False, "exact"), (4, False, "nearest"), (2, True, "nearest")])
def test_forward_and_gradients_equal_dense_reference(tiny_gptq_factory, bits, act_order, strategy):
    folder = tiny_gptq_factory(bits, act_order=act_order)
    model = model_with(folder, r=8, merge_strategy=strategy, projection_prng_key=11)
    layer = model.base_model.model.get_submodule(NAME)
    randomize(model, std_b=0.05 if bits < 8 else 0.01)
    d, b = layer.qavera_lambda_d["default"], layer.qavera_lambda_b["default"]
    d_ref, b_ref = (p.detach().clone().requires_grad_() for p in (d, b))
    q, z, s, g = unpacked(folder, NAME, bits)
    A, B = peft_vera_projections(11, 8, 4, 128)  # widest: 4 pooled groups (down_proj), 128 outputs (gate/up)
    W = dense_vera(q, z, s, g, A[:, :4], B[:64], d_ref, b_ref, strategy == "exact", bits)
    if strategy == "exact":  # the shifts matter and are not all clamped away
        k = (W.detach() / s[g] - q + z[g]).round()
        assert (k != 0).float().mean() > 0.05 and (k.abs() < 2**bits - 1).all()
    x = torch.randn(3, layer.in_features)
    grad_y = torch.randn(3, layer.out_features)
    out = layer(x)  # with gradients on a CPU: the training kernel (one adapted weight)
    out.backward(grad_y)
    (x @ W).backward(grad_y)
    torch.testing.assert_close(out.detach(), (x @ W).detach(), rtol=2e-3, atol=2e-3)
    with torch.no_grad():  # inference: the loader's kernel plus the pooled adapter
        torch.testing.assert_close(layer(x), (x @ W).detach(), rtol=2e-3, atol=2e-3)
    assert layer.projections.A["default"].grad is None and not layer.projections.A["default"].requires_grad
    for got, ref in ((d.grad, d_ref.grad), (b.grad, b_ref.grad)):
        assert ref.abs().max() > 1e-4
        # exact: the layer multiplies by fp16-rounded scales, so errors scale with the gradient
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


def test_coarser_pooling_slices_fewer_columns(tiny_gptq):
    model = model_with(tiny_gptq, r=4, group_size=64, merge_strategy="nearest")
    layer = model.base_model.model.get_submodule(NAME)
    A_eff, B_eff = layer.factors("default")
    assert model.base_model.qavera_A["default"].shape == (4, 2) and A_eff.shape == (4, 2) and B_eff.shape == (64, 4)


# --- merge: in memory and file to file, exactly --------------------------------------------------------------


@pytest.mark.parametrize("save_projection,train_scales", [(True, False), (False, True)])
def test_exact_merge_equals_the_trained_model(tiny_gptq_factory, tmp_path, save_projection, train_scales):
    folder = tiny_gptq_factory(4, act_order=True)
    model = model_with(folder, r=16, save_projection=save_projection, train_scales=train_scales)
    randomize(model, std_b=0.05, std_c=0.003)
    x = torch.randint(0, 128, (2, 16))
    trained = logits(model, x)
    assert (trained - logits(load_gptq_model(folder), x)).abs().max() > 1e-2  # the adapter is not a no-op
    model.save_pretrained(tmp_path / "adapter")
    report = merge_checkpoint(folder, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert report["strategy"] == "exact" and report["total"]["moved"] > 0
    exported_model = load_gptq_model(tmp_path / "out")  # transformers + GPTQModel read the merged file
    exported = logits(exported_model, x)
    merged_model = model.merge_and_unload()
    torch.testing.assert_close(exported, trained, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(logits(merged_model, x), trained, rtol=2e-3, atol=2e-3)
    in_memory, from_file = (quant_tensors(m.get_submodule(NAME)) for m in (merged_model, exported_model))
    assert torch.equal(in_memory.zeros(), from_file.zeros())  # one implementation, two drivers
    assert torch.equal(in_memory.scales, from_file.scales)
    base_scales = read_tensors(folder / "model.safetensors", [f"{NAME}.scales"])[f"{NAME}.scales"]
    assert torch.equal(from_file.scales, base_scales) != train_scales


def test_cli_merge_of_a_nearest_adapter(tiny_gptq, tmp_path, capsys):
    from peft_qalora.cli import main

    model = model_with(tiny_gptq, r=8, merge_strategy="nearest")
    randomize(model, std_b=0.2)
    model.save_pretrained(tmp_path / "adapter")
    main(["merge", "--base", str(tiny_gptq), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
    assert "merged 14 layers (4-bit, strategy nearest, gptq)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["total"]["moved"] > 0


# --- save and reload ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_then_load_in_fresh_process(tiny_gptq, tmp_path, save_projection):
    model = model_with(tiny_gptq, r=8, projection_prng_key=3, save_projection=save_projection, merge_strategy="nearest")
    randomize(model)
    x = torch.randint(0, 128, (2, 10))
    want = logits(model, x)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["projection_prng_key"], config["projection_shape"]) == ("QAVERA", 3, [4, 128])
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 14 + (2 if save_projection else 0)
    if save_projection:
        assert torch.equal(tensors["base_model.qavera_A"], peft_vera_projections(3, 8, 4, 128)[0])
        assert tensors["base_model.qavera_B"].shape == (128, 8)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, peft_qalora
        from peft import PeftModel
        base = peft_qalora.load_gptq_model({str(tiny_gptq)!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, rtol=0, atol=0)


def test_saved_projections_are_the_ones_loaded(tiny_gptq, tmp_path):
    model = model_with(tiny_gptq, r=8, merge_strategy="nearest")
    randomize(model)
    x = torch.randint(0, 128, (2, 10))
    want = logits(model, x)
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.qavera_B"] = tensors["base_model.qavera_B"] * 2  # doubles every update
    save_file(tensors, weights)
    reloaded = PeftModel.from_pretrained(load_gptq_model(tiny_gptq), tmp_path / "adapter")
    assert (logits(reloaded, x) - want).abs().max() > 1e-3  # not regenerated from the key
    layers = read_adapter(tmp_path / "adapter")[1]  # the file merge reads them too
    torch.testing.assert_close(layers[NAME].B, 2 * model.base_model.model.get_submodule(NAME).factors("default")[1])


# --- training --------------------------------------------------------------------------------------------------


def test_trainer_steps_lower_loss_and_touch_only_d_and_b(tiny_gptq, tmp_path):
    from test_training import fixed_batch, loss_on, snapshot
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(prepare_model_for_training(load_gptq_model(tiny_gptq)), QAVeraConfig(r=16))
    batch = fixed_batch()
    before_loss, (quant, params) = loss_on(model, batch), snapshot(model)
    projections = {k: v.clone() for k, v in model.base_model.qavera_A.items()}
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    args = TrainingArguments(tmp_path, max_steps=8, learning_rate=3e-2, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", logging_steps=100, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    after = loss_on(model, batch)
    assert after < before_loss - 0.05, (before_loss, after)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), params[n])}
    assert changed and all(".qavera_lambda_" in n for n in changed), changed
    assert all(torch.equal(b, quant[n]) for n, b in model.named_buffers() if n in quant)
    assert torch.equal(model.base_model.qavera_A["default"], projections["default"])


def test_cli_train_method_vera(tiny_gptq, tmp_path, capsys):
    from peft_qalora.cli import main

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    main(["train", str(tiny_gptq), str(tmp_path / "adapter"), "--method", "vera", "--lora-r", "8", "--text", str(text),
          "--steps", "2", "--batch-size", "2", "--seq-len", "16"])
    assert '"trainable_parameters": 1136' in capsys.readouterr().out  # r + out per layer
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["merge_strategy"], config["train_scales"]) == \
        ("QAVERA", 8, "exact", False)
    report = merge_checkpoint(tiny_gptq, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert report["strategy"] == "exact"


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"QAVeraConfig: r=0 must be a positive integer"),
    (dict(projection_prng_key=-1), r"projection_prng_key=-1 must be an integer in \[0, 2\*\*63\)"),
    (dict(vera_dropout=1.0), r"vera_dropout=1.0 must be in \[0, 1\)"),
    (dict(d_initial=float("nan")), r"d_initial=nan must be a finite number"),
    (dict(merge_strategy="round"), r"merge_strategy='round'; expected one of"),
    (dict(train_scales=True, merge_strategy="nearest"), r"train_scales=True needs merge_strategy='exact'"),
    (dict(bias="all"), r"bias='all' is not supported"),
    (dict(group_size=0), r"group_size=0 must be a positive integer"),
])
def test_bad_config_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QAVeraConfig(**kwargs)


def test_bad_model_and_files_are_refused(tiny_gptq, tmp_path):
    from peft_qalora.training import recipe as train
    from peft_qalora.merge import adapters
    from peft_qalora.tuners.qavera import config as qavera_config
    import dataclasses

    assert set(adapters.QAVERA_CONFIG_TYPES) == {f.name for f in dataclasses.fields(qavera_config.QAVeraConfig)}
    with pytest.raises(ValueError, match="group_size=48 is not a whole multiple"):
        model_with(tiny_gptq, group_size=48)
    with pytest.raises(ValueError, match="method='vera' .*without scales_only and use_dora"):
        train.TrainSettings(method="vera", use_dora=True)
    model = model_with(tiny_gptq, r=4, save_projection=False)
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"projection_shape": None}))
    with pytest.raises(ValueError, match="neither the QA-VeRA projections .* nor projection_shape"):
        read_adapter(tmp_path / "adapter")
    path.write_text(json.dumps(config))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("qavera_lambda_d"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"qavera_lambda_d \[3\], .* with r=4 they must be \[r\]"):
        read_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="shape"):
        PeftModel.from_pretrained(load_gptq_model(tiny_gptq), tmp_path / "adapter")


@pytest.mark.parametrize("first_import", ["import peft_qalora.tuners.qavera", "import peft_qalora.tuners.qavera.config",
                                          "import peft_qalora.tuners.qavera.layer", "import peft_qalora.tuners.qavera.model",
                                          "from peft_qalora import QAVeraConfig"])
def test_registered_whatever_is_imported_first(first_import):
    code = f"""{first_import}
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
print(PEFT_TYPE_TO_CONFIG_MAPPING["QAVERA"].__name__, PEFT_TYPE_TO_CONFIG_MAPPING["QALORA"].__name__)"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[-1] == "QAVeraConfig QALoraConfig"


def test_reading_a_vera_adapter_never_imports_peft(tiny_gptq, tmp_path):
    model_with(tiny_gptq, r=4, save_projection=False).save_pretrained(tmp_path / "adapter")
    code = f"""import sys
from peft_qalora.merge.adapters import read_adapter
layers = read_adapter({str(tmp_path / "adapter")!r})[1]
print(len(layers), sorted(m for m in ("peft", "transformers") if m in sys.modules))"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[-1] == "14 []"


def test_export_lora_of_a_nearest_adapter_is_loaded_by_peft_and_agrees(tiny_gptq_factory, tmp_path):
    from peft import LoraConfig

    from peft_qalora.evaluate import logits_on
    from peft_qalora.exports.lora import export_lora

    base = tiny_gptq_factory(4, act_order=True)
    model = model_with(base, r=8, merge_strategy="nearest")
    randomize(model)
    ids = torch.randint(0, 128, (2, 12))
    expected = logits_on(model.eval(), ids)
    model.save_pretrained(tmp_path / "vera")
    export_lora(tmp_path / "vera", tmp_path / "lora", base)
    lora = PeftModel.from_pretrained(load_gptq_model(base), tmp_path / "lora").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig) and lora.peft_config["default"].lora_alpha == 8
    assert logits_on(lora, ids).sub(logits_on(load_gptq_model(base), ids)).abs().max() > 1e-2  # it does something
    torch.testing.assert_close(logits_on(lora, ids), expected, rtol=1e-4, atol=1e-4)
    exact = model_with(base, r=8)
    exact.save_pretrained(tmp_path / "exact")
    with pytest.raises(ValueError, match="merge_strategy='exact'"):
        export_lora(tmp_path / "exact", tmp_path / "lora2", base)


def test_sft_trainer_and_every_export_of_an_exact_adapter(tiny_gptq, tmp_path):
    """SFTTrainer trains it; save_quantized writes the file merge's zeros and scales."""
    from trl import SFTConfig, SFTTrainer

    from helpers.tiny import tiny_tokenizer
    from peft_qalora import save_quantized

    data = Dataset.from_dict({"text": ["To be, or not to be, that is the question. " * 2] * 8})
    args = SFTConfig(tmp_path / "sft", max_steps=3, learning_rate=3e-2, per_device_train_batch_size=4, report_to=[],
                     save_strategy="no", logging_steps=100, use_cpu=True, dataset_text_field="text", max_length=32)
    trainer = SFTTrainer(model=prepare_model_for_training(load_gptq_model(tiny_gptq)), args=args, train_dataset=data,
                         processing_class=tiny_tokenizer(), peft_config=QAVeraConfig(r=8))
    trainer.train()
    model = trainer.model
    assert type(model.base_model).__name__ == "QAVeraModel"
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "qavera_lambda_b" in n)
    randomize(model)  # shifts of several steps, so a wrong merge would show
    model.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tiny_gptq, tmp_path / "adapter", tmp_path / "gptq", progress=False)
    want = read_tensors(tmp_path / "gptq" / "model.safetensors")
    merged = PeftModel.from_pretrained(load_gptq_model(tiny_gptq), tmp_path / "adapter").merge_and_unload()
    save_quantized(merged, tmp_path / "saved", tokenizer=tiny_tokenizer())
    got = read_tensors(tmp_path / "saved" / "model.safetensors")
    for key in (f"{NAME}.qzeros", f"{NAME}.scales"):
        assert torch.equal(got[key], want[key])
    assert not torch.equal(want[f"{NAME}.qzeros"], read_tensors(tiny_gptq / "model.safetensors")[f"{NAME}.qzeros"])
