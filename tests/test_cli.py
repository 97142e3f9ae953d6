"""The command line: shipped recipes parse, flags override recipes, merge and its refusals, quiet output."""

import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.cli import build_parser, load_recipe, main, train_settings

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(str(path))
    settings = train_settings(build_parser().parse_args(["train", "--config", str(path)]), recipe)
    assert recipe["base"] and recipe["out_dir"] and settings.qalora_config().r == settings.r


def test_flags_override_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: b\nout_dir: o\ntrain:\n  steps: 7\n  r: 4\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--steps", "3"])
    settings = train_settings(args, load_recipe(str(path)))
    assert (settings.steps, settings.r, settings.learning_rate) == (3, 4, 2e-4)
    path.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ValueError, match=r"unknown train keys \['stepz'\]"):
        load_recipe(str(path))


def test_cli_merge_and_refusal(tiny_gptq, tmp_path, capsys):
    model = get_peft_model(load_gptq_model(tiny_gptq), QALoraConfig(r=2, init_lora_weights=False, merge_strategy="nearest"))
    torch.nn.init.normal_(model.base_model.model.model.layers[0].mlp.up_proj.qalora_B["default"].weight, std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    main(["merge", "--base", str(tiny_gptq), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "merged 14 layers (4-bit, strategy nearest, gptq)" in out and (tmp_path / "out/merge_report.json").is_file()
    with pytest.raises(SystemExit, match="already exists; choose another folder or pass --overwrite"):
        main(["merge", "--base", str(tiny_gptq), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])


def test_cli_merge_to_awq_equals_merge_then_export(tiny_gptq, tmp_path, capsys):
    from peft_qalora.gptq import checkpoint as ckpt

    model = get_peft_model(load_gptq_model(tiny_gptq), QALoraConfig(r=2, init_lora_weights=False))  # exact + scales
    model.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    main(["merge", "--base", str(tiny_gptq), "--adapter", adapter, "--out", str(tmp_path / "awq"), "--format", "awq"])
    assert "exported 14 quantized linears (4-bit g32) to awq" in capsys.readouterr().out
    assert (tmp_path / "awq" / "merge_report.json").is_file() and not list(tmp_path.glob(".awq*"))
    main(["merge", "--base", str(tiny_gptq), "--adapter", adapter, "--out", str(tmp_path / "gptq"),
          "--checkpoint-format", "gptq_v2"])
    main(["export", str(tmp_path / "gptq"), str(tmp_path / "awq2"), "--format", "awq"])
    one, two = (ckpt.read_tensors(tmp_path / d / "model.safetensors") for d in ("awq", "awq2"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_a_partial_adapter_leaves_the_other_layers_as_the_base_holds_them(tiny_gptq, tmp_path, capsys):
    """An adapter on q_proj only, merged into a v1 base as gptq_v2 and as AWQ: every other layer dequantizes to the
    base's weights (the reference unpacker reads v1 fields + 1, v2 fields as they are; GPTQModel's AWQ unpacker),
    and q_proj does change. Before the fix, gptq_v2 copied the other layers' v1 bytes under a v2 label."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from helpers.reference import dense_weight

    from peft_qalora.gptq import checkpoint as ckpt

    model = get_peft_model(load_gptq_model(tiny_gptq), QALoraConfig(r=2, init_lora_weights=False,
                                                                     target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    main(["merge", "--base", str(tiny_gptq), "--adapter", adapter, "--out", str(tmp_path / "v2"),
          "--checkpoint-format", "gptq_v2"])
    main(["merge", "--base", str(tiny_gptq), "--adapter", adapter, "--out", str(tmp_path / "awq"), "--format", "awq"])
    capsys.readouterr()
    base, v2, awq = (ckpt.read_tensors(tmp_path / d / "model.safetensors") if d else ckpt.read_tensors(
        tiny_gptq / "model.safetensors") for d in (None, "v2", "awq"))
    layers = sorted(k.removesuffix(".qweight") for k in base if k.endswith(".qweight"))
    report = __import__("json").loads((tmp_path / "v2" / "merge_report.json").read_text())
    assert report["layers_outside_the_adapter_reencoded"] == len(layers) - 2  # 2 blocks, one q_proj each
    for name in layers:
        t = lambda d, s: d[f"{name}.{s}"]  # noqa: E731
        want = dense_weight(*(t(base, s) for s in ("qweight", "qzeros", "scales", "g_idx")), 4, zero_offset=1)
        got = dense_weight(*(t(v2, s) for s in ("qweight", "qzeros", "scales", "g_idx")), 4, zero_offset=0)
        served = dequantize_gemm(t(awq, "qweight"), t(awq, "qzeros"), t(awq, "scales"), 4, 32).T.float()
        if name.endswith("q_proj"):
            assert not torch.equal(got, want) and torch.equal(served, got.half().float())
        else:
            assert torch.equal(got, want) and torch.equal(served, want.half().float()), name


def test_cli_export_refusals_name_the_fix(tiny_gptq_factory, tmp_path, capsys):
    three = tiny_gptq_factory(3)
    with pytest.raises(SystemExit, match="3-bit but AWQ holds only 4-bit.*compressed-tensors"):
        main(["export", str(three), str(tmp_path / "x"), "--format", "awq"])
    with pytest.raises(SystemExit, match="act-order"):
        main(["merge", "--base", str(tiny_gptq_factory(4, act_order=True)), "--adapter", str(tmp_path / "none"),
              "--out", str(tmp_path / "x"), "--format", "awq"])
    assert not list(tmp_path.iterdir())
    main(["export", str(three), str(tmp_path / "ct"), "--format", "compressed-tensors"])
    assert (tmp_path / "ct" / "config.json").is_file()
    assert "note: vLLM 0.32 has no kernel for asymmetric 3-bit weights" in capsys.readouterr().out


def test_cli_export_lora(tiny_gptq, tmp_path, capsys):
    model = get_peft_model(load_gptq_model(tiny_gptq), QALoraConfig(r=2, merge_strategy="nearest"))
    model.save_pretrained(tmp_path / "adapter")
    main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "lora"), "--base", str(tiny_gptq)])
    # per decoder layer, r=2: six linears read 64 inputs (2 groups), down_proj 128 (4 groups); 2 layers
    # A: 2 * (6 * 2 + 4) * 2 = 64 pooled -> 2 * (6 * 64 + 128) * 2 = 2,048 standard
    assert "A grew from 64 to 2,048 parameters" in capsys.readouterr().out


def test_save_quantized_as_awq_equals_export_of_the_gptq_folder(tiny_gptq, tmp_path):
    from peft_qalora import export, save_quantized
    from peft_qalora.gptq import checkpoint as ckpt

    model = get_peft_model(load_gptq_model(tiny_gptq), QALoraConfig(r=2, init_lora_weights=False))
    merged = model.merge_and_unload()
    save_quantized(merged, tmp_path / "direct", format="awq")
    save_quantized(merged, tmp_path / "gptq", zero_format=2)
    export(tmp_path / "gptq", tmp_path / "via", "awq", progress=False)
    one, two = (ckpt.read_tensors(tmp_path / d / "model.safetensors") for d in ("direct", "via"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct", "gptq", "via"]


def test_cli_is_quiet_unless_verbose(tiny_gptq, tmp_path, capfd):
    """Loading a GPTQ model prints none of GPTQModel's INFO lines, transformers' bars or the FutureWarning
    peft triggers, unless --verbose (before or after the command); our own output stays."""
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)

    def run(before: list[str], after: list[str], folder: str) -> str:
        train = ["train", str(tiny_gptq), str(tmp_path / folder), "--text", str(text), "--steps", "1",
                 "--batch-size", "1", "--seq-len", "16"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main([*before, *train, *after])
        out, err = capfd.readouterr()
        return out + err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)

    quiet = run([], [], "quiet")
    assert '"trainable_parameters": 2304' in quiet and "done in" in quiet  # the default: scales only, by hand
    assert "INFO" not in quiet and "Loading weights" not in quiet and "is_gradient_checkpointing" not in quiet
    for verbose in (run(["--verbose"], [], "before"), run([], ["--verbose"], "after")):
        assert "INFO  QuantizeConfig: offload_to_disk_path" in verbose and "Loading weights" in verbose
        assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in verbose


def test_one_default_for_library_recipe_and_cli():
    from peft_qalora import QALoraConfig, names
    from peft_qalora.training.recipe import TrainSettings

    assert QALoraConfig().lora_alpha == TrainSettings().lora_alpha == names.DEFAULT_LORA_ALPHA
    assert TrainSettings().scales_only is True  # as `peft-qalora train` with no adapter option
    assert TrainSettings(r=8).scales_only is False and TrainSettings(merge_strategy="nearest").scales_only is False
    assert train_settings(build_parser().parse_args(["train", "B", "O"]), {}).scales_only is True
    assert train_settings(build_parser().parse_args(["train", "B", "O", "--lora-r", "16"]), {}).scales_only is False


def test_version_and_help_say_what_each_command_writes(capsys):
    from peft_qalora import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"peft-qalora {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "The only module" not in text and "GGUF" in text and "instruction JSONL" in text
    assert "fp16 scales by default" in text  # train's default is scales only, not an adapter
