"""Tests for peft_qalora.base.quantize: GPTQModel quantization into a portable v1 checkpoint.

The tiny random LLaMA gets some all-positive weight groups on purpose: GPTQModel's stock
asymmetric quantizer gives those a true zero of 0 (not storable in v1), so the tests can show the
stock run producing them and the `portable_zeros` run not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.tensors import zeros_as_gptqmodel_reads, zeros_as_per_field_readers
from peft_qalora.base.quantize import QuantizeSettings, portable_zero_points, quantize_model, refit_zero_points

from helpers.tiny import TINY, tiny_tokenizer

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40


def build_tiny_float(folder: Path, seed: int = 0) -> Path:
    """A tiny fp32 LLaMA + tokenizer in `folder`; every 4th 32-wide input group of each row made positive."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                groups = module.weight.view(module.out_features, -1, 32)  # (out, n_groups, 32)
                groups[:, ::4] = groups[:, ::4].abs() + 0.01  # min > 0: the stock zero is round(0) = 0
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory) -> Path:
    return build_tiny_float(tmp_path_factory.mktemp("tiny-float"))


def true_zeros(folder: Path, bits: int, reader=zeros_as_gptqmodel_reads) -> torch.Tensor:
    """Every true zero of the checkpoint, as `reader` decodes them (default: as GPTQModel does), flattened."""
    found = []
    for shard in ckpt.shard_files(folder):
        keys = [k for k in ckpt.tensor_names(shard) if k.endswith(".qzeros")]
        found += [reader(q, bits, 1).flatten() for q in ckpt.read_tensors(shard, keys).values()]
    return torch.cat(found)


SETTINGS = dict(bits=2, group_size=32, calibration_windows=8, seq_len=32, batch_size=4)


# ---------------------------------------------------------------- the refit (pure tensors)


def test_mirrored_grid_hand_worked():
    # 2 bits (maxq 3). Lane 0: range [-0.1, 3.0], stock s = 3.1/3, z = round(0.097) = 0: grid s * {0, 1, 2, 3}.
    # Mirrored: scale -s, zero 3, grid -s * ({0, 1, 2, 3} - 3) = s * {3, 2, 1, 0}: the same values.
    # Lane 1: range [-1, 2], z = 1: untouched.
    xmin, xmax = torch.tensor([-0.1, -1.0]), torch.tensor([3.0, 2.0])
    scale = (xmax - xmin) / 3
    zero = torch.round(-xmin / scale)
    assert zero.tolist() == [0.0, 1.0]
    new_scale, new_zero = refit_zero_points(scale, zero, maxq=3)
    assert new_zero.tolist() == [3.0, 1.0]
    assert torch.equal(new_scale, torch.stack([-scale[0], scale[1]]))
    q = torch.arange(4.0)
    stock_grid = sorted((scale[0] * (q - 0)).tolist())
    mirrored_grid = sorted((new_scale[0] * (q - new_zero[0])).tolist())
    assert mirrored_grid == pytest.approx(stock_grid)


def test_patch_refits_stock_quantizer_and_restores_it():
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    stock = Quantizer.find_params
    quantizer = Quantizer(QuantizeConfig(bits=2, group_size=32, sym=False))
    quantizer.configure(perchannel=True)
    w = torch.randn(16, 32)
    w[:8] = w[:8].abs() + 0.01  # rows 0-7 all positive: stock zero 0
    quantizer.find_params(w, weight=True)
    assert (quantizer.zero[:8] == 0).all()
    with portable_zero_points():
        assert Quantizer.find_params is not stock
        quantizer.find_params(w, weight=True)
        assert quantizer.zero.min() >= 1 and quantizer.zero.max() <= 3 and (quantizer.scale[:8] < 0).all()
        mirrored = quantizer.quantize(w)
    quantizer.find_params(w, weight=True)
    torch.testing.assert_close(mirrored, quantizer.quantize(w))  # the mirrored grid changes no value
    assert Quantizer.find_params is stock


# ---------------------------------------------------------------- end to end with GPTQModel


def test_quantize_portable_zeros_end_to_end(tiny_float, tmp_path):
    from peft_qalora.base.load import load_gptq_model

    out = tmp_path / "q2"
    summary = quantize_model(tiny_float, out, QuantizeSettings(**SETTINGS, portable_zeros=True), [TEXT])
    zeros = true_zeros(out, bits=2)
    assert zeros.min() >= 1 and zeros.max() <= 3
    assert torch.equal(zeros, true_zeros(out, bits=2, reader=zeros_as_per_field_readers))  # vLLM, ExLlamaV2 agree
    assert summary["zeros_out_of_range"] == 0 and summary["zeros_total"] == zeros.numel()
    assert summary["bits"] == 2 and summary["calibration_windows_used"] == 8

    model = load_gptq_model(out)
    logits = model(torch.randint(3, 128, (1, 16))).logits
    assert logits.shape == (1, 16, 128) and torch.isfinite(logits).all()
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".q2.partial-*"))


def test_quantize_stock_zeros_show_the_problem(tiny_float, tmp_path):
    """Without the patch the same model gets true zeros of 0: the test model really exercises it."""
    summary = quantize_model(tiny_float, tmp_path / "stock", QuantizeSettings(**SETTINGS, portable_zeros=False),
                             [TEXT])
    assert summary["zeros_below_range"] > 0
    zeros = true_zeros(tmp_path / "stock", bits=2)
    assert int((zeros == 0).sum()) == summary["zeros_below_range"]
    assert not torch.equal(zeros, true_zeros(tmp_path / "stock", bits=2, reader=zeros_as_per_field_readers))


def test_config_fields(tiny_float, tmp_path):
    quantize_model(tiny_float, tmp_path / "q", QuantizeSettings(**SETTINGS), [TEXT])
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert quant == json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert quant["quant_method"] == "gptq" and quant["sym"] is False
    assert quant["checkpoint_format"] == "gptq" and quant["format"] == "gptq"
    assert quant["bits"] == 2 and quant["group_size"] == 32 and quant["desc_act"] is False
    assert quant["pack_dtype"] == "int32" and quant["lm_head"] is False
    assert any(tag.startswith("gptqmodel:") for tag in quant["meta"]["quantizer"])
    assert not {"dynamic", "rotation"} & set(quant)


def test_refuses_existing_out_dir(tiny_float, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"quantize: .*exists.*overwrite=True"):
        quantize_model(tiny_float, out, QuantizeSettings(**SETTINGS), [TEXT])
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_tokenizer_names_the_fix(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"quantize: .*no tokenizer.*save_pretrained"):
        quantize_model(tmp_path, tmp_path / "out", QuantizeSettings(**SETTINGS), [TEXT])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(bits=5), r"bits=5"), (dict(group_size=48), r"group_size=48"), (dict(damp_percent=0), r"damp_percent")],
)
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=rf"quantize: .*{match}"):
        QuantizeSettings(**kwargs)
