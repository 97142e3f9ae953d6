"""The command line: shipped recipes parse, flags override recipes, merge and its refusals."""

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
