"""QA-LoRA behaves as a peft method: registry, save/load (in a fresh process), adapters API."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_qalora import QALoraConfig, load_gptq_model


def make(folder, **kw):
    return get_peft_model(load_gptq_model(folder), QALoraConfig(**(dict(r=4, init_lora_weights=False, merge_strategy="nearest") | kw)))


def test_registered_with_peft(tmp_path):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    assert PeftType("QALORA") is PeftType.QALORA and "QALORA" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["QALORA"] is QALoraConfig
    QALoraConfig(r=8).save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, QALoraConfig) and again.r == 8


def test_save_then_load_in_fresh_process(tiny_gptq, tmp_path):
    peft_model = make(tiny_gptq)
    x = torch.randint(0, 128, (2, 10))
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "QALORA"
    tensors = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert len(tensors) == 2 * 14 and all(".qalora_A.weight" in k or ".qalora_B.weight" in k for k in tensors)
    a = tensors["base_model.model.model.layers.0.mlp.down_proj.qalora_A.weight"]
    b = tensors["base_model.model.model.layers.0.mlp.down_proj.qalora_B.weight"]
    assert a.shape == (4, 4) and b.shape == (64, 4)  # (r, in/32), (out, r)
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
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits, rtol=0, atol=0)


def test_disable_add_set_delete_adapters(tiny_gptq):
    peft_model = make(tiny_gptq).eval()
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        first = peft_model(x).logits
        with peft_model.disable_adapter():
            base = peft_model(x).logits
        peft_model.add_adapter("other", QALoraConfig(r=2, init_lora_weights=False, merge_strategy="nearest"))
        peft_model.set_adapter("other")
        other = peft_model(x).logits
        peft_model.set_adapter("default")
        torch.testing.assert_close(peft_model(x).logits, first)
        peft_model.delete_adapter("other")
    assert not torch.allclose(first, base) and not torch.allclose(other, first)
    assert "other" not in peft_model.peft_config
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert "other" not in layer.qalora_A and "other" not in layer.r


def test_modules_to_save_are_trained_and_saved(tiny_gptq, tmp_path):
    peft_model = make(tiny_gptq, modules_to_save=["lm_head"])
    assert any("modules_to_save" in n and p.requires_grad for n, p in peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_loading_onto_a_base_with_other_groups_is_refused(tiny_gptq_factory, tmp_path):
    make(tiny_gptq_factory(4, group_size=32)).save_pretrained(tmp_path)
    other = load_gptq_model(tiny_gptq_factory(4, group_size=16))
    with pytest.raises(ValueError, match="was trained on a base quantized with .*group_size.*Load the adapter onto"):
        PeftModel.from_pretrained(other, tmp_path)


def test_loading_with_mismatched_shapes_is_refused(tiny_gptq_factory, tmp_path):
    make(tiny_gptq_factory(4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_quantization"] = None  # an adapter from an older writer: only the shapes can tell
    config["group_size"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape .* but this base needs"):
        PeftModel.from_pretrained(load_gptq_model(tiny_gptq_factory(4, group_size=16)), tmp_path)


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_merge_path_never_imports_peft_or_transformers():
    # the file-to-file merge must start fast: peft + transformers cost ~7 s and ~0.9 GB to import
    out = _fresh("""
        import sys, peft_qalora, peft_qalora.cli, peft_qalora.merge.files
        print(sorted(m for m in ("peft", "transformers", "bitsandbytes") if m in sys.modules))
    """)
    assert out == "[]"


def test_merge_command_copies_shards_before_importing_torch():
    # `peft-qalora merge` opens folders.ShardCopies first, so the copy overlaps torch's import
    out = _fresh("""
        import sys, peft_qalora.cli, peft_qalora.gptq.folders
        print("torch" in sys.modules)
    """)
    assert out == "False"


@pytest.mark.parametrize("first_import", ["import peft_qalora", "import peft_qalora.tuners.qalora.layer",
                                          "import peft_qalora.tuners.qalora.model",
                                          "from peft_qalora.tuners.qalora.config import QALoraConfig",
                                          "import peft_qalora.training.recipe",
                                          "from peft_qalora import QALoraConfig", "import peft_qalora.base.load",
                                          # a probe for peft before its import (trl's is_peft_available does one)
                                          "import peft_qalora, importlib.util; importlib.util.find_spec('peft')"])
def test_registered_whatever_is_imported_first(first_import):
    out = _fresh(f"""
        {first_import}
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import PeftType
        print(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.QALORA].__name__, PEFT_TYPE_TO_TUNER_MAPPING["QALORA"].__name__)
    """)
    assert out.splitlines()[-1] == "QALoraConfig QALoraModel"
