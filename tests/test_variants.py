"""Method variants on GPTQ: scales-only (the PEQA control) and QA-DoRA, against dense float references
built independently from the checkpoint tensors, and merged exactly (in memory and file to file)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from helpers.reference import assert_layer_matches, naive_unpack

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.merge.adapters import read_adapter
from peft_qalora.gptq.checkpoint import read_tensors
from peft_qalora.merge.files import merge_checkpoint

KEYS = ("qweight", "qzeros", "scales", "g_idx")
NAME = "model.layers.0.mlp.down_proj"  # 128 inputs: 4 groups of 32


def unpacked(folder, name, bits):
    t = read_tensors(folder / "model.safetensors", [f"{name}.{k}" for k in KEYS])
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in KEYS)
    q = naive_unpack(qweight, bits, g_idx.numel(), along_rows=True).float()  # (in, out)
    z = naive_unpack(qzeros, bits, scales.shape[1], along_rows=False).float() + 1  # (G, out), v1 zeros
    return q, z, scales.float(), g_idx.long()


def randomize(model, seed=3, std_b=0.3, std_c=0.01, std_e=0.02):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qalora_B" in name:
                p.normal_(std=std_b)
            elif "qalora_scale" in name:
                p.normal_(std=std_c)
            elif "qalora_magnitude" in name:
                p.normal_(std=std_e)


def model_with(folder, **config):
    config = dict(r=4, lora_alpha=8, init_lora_weights=False) | config
    return get_peft_model(load_gptq_model(folder), QALoraConfig(**config))


# --- scales only -----------------------------------------------------------------------------------


def test_scales_only_has_no_factors_and_counts_groups_times_outputs(tiny_gptq):
    model = model_with(tiny_gptq, scales_only=True)
    layers = [m for m in model.modules() if hasattr(m, "qalora_scale")]
    assert layers and all(not m.qalora_A and not m.qalora_B for m in layers)
    trainable, _ = model.get_nb_trainable_parameters()
    # by hand: per decoder layer q,k,v,o (64 in: 2 groups), gate/up (64 in), down (128 in: 4 groups)
    expected = sum((m.in_features // 32) * m.out_features for m in layers)
    assert trainable == expected == 2 * (2 * 64 + 2 * 32 + 2 * 32 + 2 * 64 + 2 * 128 * 2 + 4 * 64)


@pytest.mark.parametrize("act_order", [False, True])
def test_scales_only_forward_and_gradient_equal_dense_reference(tiny_gptq_factory, act_order):
    folder = tiny_gptq_factory(3, act_order=act_order)
    model = model_with(folder, scales_only=True)
    layer = model.base_model.model.get_submodule(NAME)
    c = layer.qalora_scale["default"]
    randomize(model)
    c_ref = c.detach().clone().requires_grad_()
    q, z, s, g = unpacked(folder, NAME, 3)
    W = (s * (1 + 10 * c_ref))[g] * (q - z[g])  # (in, out); the parameter is c / scale_lr_ratio
    assert_layer_matches(layer, W, ((c, c_ref),), grad_atol=1e-3)


def test_scales_only_saves_reloads_and_merges_exactly(tiny_gptq_factory, tmp_path):
    folder = tiny_gptq_factory(4, act_order=True)
    model = model_with(folder, scales_only=True)
    randomize(model, std_c=0.05)
    x = torch.randint(0, 128, (2, 16))
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    config, layers = read_adapter(tmp_path / "adapter")
    assert config["scales_only"] is True and all(l.A is None and l.scale_delta is not None for l in layers.values())
    reloaded = PeftModel.from_pretrained(load_gptq_model(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, trained, rtol=0, atol=0)
    report = merge_checkpoint(folder, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert report["total"]["moved"] == 0  # scales only: no zero moves
    old, new = (read_tensors(f / "model.safetensors", [f"{NAME}.scales"])[f"{NAME}.scales"] for f in (folder, tmp_path / "out"))
    c = model.base_model.model.get_submodule(NAME).qalora_scale["default"].detach() * 10
    assert torch.equal(new, (old.float() * (1 + c)).half())  # by hand: fp16(s * (1 + c))
    with torch.no_grad():
        exported = load_gptq_model(tmp_path / "out")(x).logits
    torch.testing.assert_close(exported, trained, rtol=2e-3, atol=2e-3)


def test_scales_only_refuses_what_it_cannot_mean():
    with pytest.raises(ValueError, match="scales_only=True trains the fp16 scales and nothing else"):
        QALoraConfig(scales_only=True, merge_strategy="nearest")
    with pytest.raises(ValueError, match="scales_only=True"):
        QALoraConfig(scales_only=True, use_dora=True)
    with pytest.raises(ValueError, match="scales_only=True"):
        QALoraConfig(scales_only=True, train_scales=False)


# --- QA-DoRA -----------------------------------------------------------------------------------------


def dense_dora(q, z, s, g, A, B, e, scaling, exact, bits, c=None):
    """W'' = m * W' / ||W'|| per output column (norm detached, as peft's DoRA), m = (1 + 10 e) ||W||;
    exact: integer shifts k rounded straight through, clamped so merged zeros stay in [1, 2^b - 1]."""
    W0 = s[g] * (q - z[g])  # (in, out)
    delta = (scaling * (B @ A)).T  # (G, out)
    s_new = s if c is None else s * (1 + 10 * c)
    if exact:
        shift = delta / s
        rounded = shift + (torch.round(shift) - shift).detach()
        bounded = torch.clamp(rounded.detach(), min=z - (2**bits - 1), max=z - 1)
        k = torch.where(bounded == rounded.detach(), rounded, bounded)  # no gradient where the clamp bites
        W1 = s_new[g] * (q - z[g] + k[g])
    else:
        W1 = s_new[g] * (q - z[g]) + delta[g]
    m = (1 + 10 * e) * W0.norm(dim=0)
    return W1 * (m / W1.detach().norm(dim=0))[None, :]


@pytest.mark.parametrize("bits,act_order,strategy", [(2, False, "exact"), (3, True, "exact"), (4, True, "exact"),
                                                      (8, False, "exact"), (4, False, "nearest"), (3, True, "nearest")])
def test_dora_forward_and_gradients_equal_dense_reference(tiny_gptq_factory, bits, act_order, strategy):
    folder = tiny_gptq_factory(bits, act_order=act_order)
    model = model_with(folder, use_dora=True, merge_strategy=strategy)
    layer = model.base_model.model.get_submodule(NAME)
    assert "default" not in layer.qalora_scale  # DoRA: trained scales off by default
    randomize(model, std_b=0.3 if bits < 8 else 0.02)
    A, B, e = layer.qalora_A["default"].weight, layer.qalora_B["default"].weight, layer.qalora_magnitude["default"]
    A_ref, B_ref, e_ref = (p.detach().clone().requires_grad_() for p in (A, B, e))
    q, z, s, g = unpacked(folder, NAME, bits)
    W = dense_dora(q, z, s, g, A_ref, B_ref, e_ref, 2.0, strategy == "exact", bits)
    # the layer multiplies by fp16-rounded scales in exact mode: errors scale with the gradient
    assert_layer_matches(layer, W, ((A, A_ref), (B, B_ref), (e, e_ref)), grad_atol=2e-3, min_grad=1e-4)


def test_dora_starts_as_the_identity(tiny_gptq):
    base = load_gptq_model(tiny_gptq)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = base(x).logits
    model = get_peft_model(base, QALoraConfig(r=4, use_dora=True))  # default init: B = 0, magnitude 0
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_scales", [False, True])
def test_dora_exact_merges_into_the_trained_model(tiny_gptq_factory, tmp_path, train_scales):
    folder = tiny_gptq_factory(4, act_order=True)
    model = model_with(folder, use_dora=True, merge_strategy="exact", train_scales=train_scales)
    randomize(model, std_b=0.3, std_c=0.02, std_e=0.03)
    x = torch.randint(0, 128, (2, 16))
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    report = merge_checkpoint(folder, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert report["total"]["moved"] > 0
    file_scales = read_tensors(tmp_path / "out" / "model.safetensors")
    with torch.no_grad():
        exported = load_gptq_model(tmp_path / "out")(x).logits
        in_memory = model.merge_and_unload()
        merged = in_memory(x).logits
    torch.testing.assert_close(exported, trained, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(merged, trained, rtol=2e-3, atol=2e-3)
    layer = in_memory.get_submodule(NAME)
    assert torch.equal(layer.scales, file_scales[f"{NAME}.scales"])  # one implementation, two drivers
    base_scales = read_tensors(folder / "model.safetensors", [f"{NAME}.scales"])[f"{NAME}.scales"]
    assert not torch.equal(layer.scales, base_scales)
    assert (trained - load_gptq_model(folder)(x).logits).abs().max() > 1e-2  # the adapter is not a no-op


def test_dora_magnitude_file_is_checked(tiny_gptq, tmp_path):
    from safetensors.torch import load_file, save_file

    model = model_with(tiny_gptq, use_dora=True)
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("qalora_magnitude"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="qalora_magnitude has .* columns but"):
        read_adapter(tmp_path / "adapter")


# --- the command line and recipes --------------------------------------------------------------------


@pytest.mark.parametrize("flag,key", [("--scales-only", "scales_only"), ("--use-dora", "use_dora")])
def test_cli_trains_and_merges_each_variant(tiny_gptq, tmp_path, flag, key):
    import json

    from peft_qalora.cli import main

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    main(["train", str(tiny_gptq), str(tmp_path / "adapter"), "--text", str(text), "--steps", "3", "--batch-size", "2",
          "--seq-len", "32", "--lora-r", "4", "--lr", "1e-2", flag])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config[key] is True
    trained = PeftModel.from_pretrained(load_gptq_model(tiny_gptq), tmp_path / "adapter").eval()
    moved = [p for n, p in trained.named_parameters() if ("qalora_scale" if key == "scales_only" else "qalora_magnitude") in n]
    assert moved and max(float(p.abs().max()) for p in moved) > 1e-4  # the variant's own parameters trained
    main(["merge", "--base", str(tiny_gptq), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_gptq_model(tmp_path / "m")(x).logits, trained(x).logits, rtol=2e-3, atol=2e-3)


def test_recipe_keys_reach_the_config(tmp_path):
    from peft_qalora.cli import build_parser, load_recipe, train_settings

    path = tmp_path / "r.yaml"
    path.write_text("train:\n  scales_only: true\n  steps: 2\n")
    recipe = load_recipe(str(path))
    config = train_settings(build_parser().parse_args(["train", "--config", str(path)]), recipe).qalora_config()
    assert config.scales_only and config.train_scales and config.merge_strategy == "exact"
    path.write_text("train:\n  use_dora: true\n")
    config = train_settings(build_parser().parse_args(["train", "--config", str(path)]), load_recipe(str(path))).qalora_config()
    assert config.use_dora and not config.train_scales


# --- a fresh process, and the exports ----------------------------------------------------------------

FRESH = """
import sys, torch
from peft import PeftModel
import peft_qalora
from peft_qalora import load_gptq_model
model = PeftModel.from_pretrained(load_gptq_model(sys.argv[1]), sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[3])).logits, sys.argv[4])
"""


@pytest.mark.parametrize("kind", [dict(scales_only=True), dict(use_dora=True, merge_strategy="exact")])
def test_variant_reloads_in_a_fresh_process_and_exports(tiny_gptq, tmp_path, kind):
    import subprocess
    import sys

    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from peft_qalora.exports import merge_and_export

    model = model_with(tiny_gptq, **kind)
    randomize(model, std_c=0.03, std_e=0.03)
    model.eval()
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", FRESH, str(tiny_gptq), str(tmp_path / "adapter"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), trained, rtol=0, atol=0)
    # the compressed-tensors package decompresses the merged export to the merged GPTQ checkpoint's weights
    merge_checkpoint(tiny_gptq, tmp_path / "adapter", tmp_path / "gptq", progress=False)
    merge_and_export(tiny_gptq, tmp_path / "adapter", tmp_path / "ct", format="compressed-tensors", progress=False)
    import json

    config = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    tensors = read_tensors(tmp_path / "ct" / "model.safetensors")
    state = {k.removeprefix(f"{NAME}."): v for k, v in tensors.items() if k.startswith(f"{NAME}.")}
    dense = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    q, z, s, g = unpacked(tmp_path / "gptq", NAME, 4)
    want = (s[g] * (q - z[g])).T  # (out, in) from the merged GPTQ folder, by the naive reference unpacker
    torch.testing.assert_close(dense, want.half(), rtol=0, atol=0)
    base_q, base_z, base_s, _ = unpacked(tiny_gptq, NAME, 4)
    assert not torch.equal(s, base_s)  # the scales did change


def test_cli_default_is_scales_only_unless_an_adapter_is_asked_for():
    from peft_qalora.cli import build_parser, train_settings

    def settings(*flags):
        return train_settings(build_parser().parse_args(["train", "b", "o", *flags]), {})

    assert settings().scales_only and settings("--steps", "5").qalora_config().scales_only
    for flags in (["--adapter"], ["--lora-r", "8"], ["--merge-strategy", "exact"], ["--use-dora"], ["--method", "vera"]):
        assert not settings(*flags).scales_only, flags
    adapter = settings("--adapter").qalora_config()
    assert adapter.train_scales and adapter.merge_strategy == "exact" and not adapter.scales_only
