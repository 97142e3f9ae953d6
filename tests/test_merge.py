"""Merging into integer zeros: math against a dense reference, the two drivers, loaders, safety."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from helpers.reference import dense_delta, dense_weight, naive_unpack

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.gptq.checkpoint import read_tensors
from peft_qalora.merge.zeros import merge_zeros
from peft_qalora.merge.files import merge_checkpoint
from peft_qalora.base.save import save_quantized

KEYS = ("qweight", "qzeros", "scales", "g_idx")


def adapter_model(folder, std=0.3, **kw):
    """A peft model whose adapter moves many zeros (B drawn large, as after real training)."""
    model = get_peft_model(load_gptq_model(folder), QALoraConfig(**(dict(r=4, lora_alpha=8, init_lora_weights=False, merge_strategy="nearest") | kw)))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "qalora_B" in name:
            torch.nn.init.normal_(p, std=std)
    return model.eval()


def layer_tensors(folder, name):
    t = read_tensors(folder / "model.safetensors", [f"{name}.{k}" for k in KEYS])
    return [t[f"{name}.{k}"] for k in KEYS]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_merged_weight_equals_base_plus_rounded_delta(tiny_gptq_factory, tmp_path, bits, act_order):
    folder = tiny_gptq_factory(bits, act_order=act_order)
    model = adapter_model(folder)
    name = "model.layers.0.mlp.down_proj"
    layer = model.base_model.model.get_submodule(name)
    A, B = layer.qalora_A["default"].weight.detach(), layer.qalora_B["default"].weight.detach()
    merge_checkpoint(folder, _save(model, tmp_path), tmp_path / "out", progress=False)
    qweight, qzeros, scales, g_idx = layer_tensors(folder, name)
    new = layer_tensors(tmp_path / "out", name)
    assert torch.equal(new[0], qweight) and torch.equal(new[2], scales) and torch.equal(new[3], g_idx)
    # reference: per element, z' = clamp(z - round(delta / s), 1, 2^b - 1), delta from a dense B A
    z = naive_unpack(qzeros, bits, scales.shape[1], along_rows=False) + 1  # (G, out)
    delta = dense_delta(A, B, layer.scaling["default"], torch.arange(scales.shape[0])).T  # (G, out)
    want_z = (z - torch.round(delta / scales.float())).clamp(1, 2**bits - 1)
    got_z = naive_unpack(new[1], bits, scales.shape[1], along_rows=False) + 1
    assert torch.equal(got_z, want_z.long())
    assert (got_z != z).float().mean() > 0.05  # the merge really moved zeros
    W, W_merged = dense_weight(qweight, qzeros, scales, g_idx, bits), dense_weight(*new, bits)
    rounded = scales.float() * (z - want_z)  # (G, out) applied update per group
    torch.testing.assert_close(W_merged, W + rounded[g_idx.long()].T, rtol=0, atol=1e-6)


def _save(model, tmp_path):
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_merge_zeros_clamps_and_counts():
    zeros = torch.tensor([[1, 8, 15]])
    scales = torch.tensor([[0.5, 0.5, 0.5]])
    delta = torch.tensor([[0.6, -0.2, -1.0]])  # shifts +1.2, -0.4, -2.0 steps
    merged, stats = merge_zeros(zeros, scales, delta, bits=4)
    assert merged.tolist() == [[1, 8, 15]]  # 1 - 1 = 0 clamps to 1; 15 + 2 = 17 clamps to 15
    assert (stats.moved, stats.clamped) == (0, 2)
    merged_v2, _ = merge_zeros(zeros, scales, delta, bits=4, zero_format=2)
    assert merged_v2.tolist() == [[0, 8, 15]]


def test_merge_report_numbers_worked_by_hand():
    zeros = torch.tensor([[1, 15], [8, 8]])
    delta = torch.tensor([[0.4, -2.0], [1.6, -0.2]])  # scales 1: shifts in steps as written
    merged, stats = merge_zeros(zeros, torch.ones(2, 2).half(), delta, bits=4)
    # steps round to [[0, -2], [2, 0]]; 15 + 2 clamps to 15, so applied = [[0, 0], [2, 0]]
    assert merged.tolist() == [[1, 15], [6, 8]] and merged.dtype == torch.int32
    assert (stats.zeros, stats.moved, stats.clamped, stats.unportable_base_zeros) == (4, 1, 1, 0)
    assert stats.max_rounding_error == pytest.approx(2.0)  # |-2.0 - 0|
    assert stats.mean_rounding_error == pytest.approx((0.4 + 2.0 + 0.4 + 0.2) / 4)
    assert stats.mean_abs_shift == pytest.approx((0.4 + 2.0 + 1.6 + 0.2) / 4)


def train_a_few_steps(model, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_in_memory_and_file_to_file_are_identical_and_transformers_agrees(tiny_gptq_factory, tmp_path):
    folder = tiny_gptq_factory(4, act_order=True)
    model = train_a_few_steps(adapter_model(folder, std=0.05))
    adapter = _save(model, tmp_path)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        adapter_logits = model(x).logits
    report = merge_checkpoint(folder, adapter, tmp_path / "files", progress=False)
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(x).logits
    save_quantized(merged, tmp_path / "memory")
    a, b = read_tensors(tmp_path / "files/model.safetensors"), read_tensors(tmp_path / "memory/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa = json.loads((tmp_path / "files/config.json").read_text())["quantization_config"]
    qb = json.loads((tmp_path / "memory/config.json").read_text())["quantization_config"]
    assert qa == qb and qa["sym"] is False and qa["checkpoint_format"] == "gptq" and qa["desc_act"] is True
    assert any(q.startswith("gptqmodel:") for q in qa["meta"]["quantizer"])
    assert report["total"]["moved"] > 0 and (tmp_path / "files/merge_report.json").is_file()
    reloaded = load_gptq_model(tmp_path / "files")  # transformers + GPTQModel, a loader we did not write
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, merged_logits, rtol=1e-4, atol=1e-4)


def test_merge_adapter_then_unmerge_restores_exact_zeros(tiny_gptq):
    model = adapter_model(tiny_gptq, std=0.05)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    before = layer.base_layer.qzeros.clone()
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        unmerged = model(x).logits
        model.merge_adapter()
        assert not torch.equal(layer.base_layer.qzeros, before)
        model.unmerge_adapter()
        assert torch.equal(layer.base_layer.qzeros, before)
        torch.testing.assert_close(model(x).logits, unmerged)


def test_peft_use_qalora_adapter_merges_with_its_convention(tiny_gptq, tmp_path):
    from peft import LoraConfig

    model = get_peft_model(load_gptq_model(tiny_gptq), LoraConfig(r=4, use_qalora=True, qalora_group_size=32,
                                                                   target_modules=["down_proj"], init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(tmp_path / "peft")
    merge_checkpoint(tiny_gptq, tmp_path / "peft", tmp_path / "out", progress=False)
    name = "model.layers.0.mlp.down_proj"
    layer = model.base_model.model.get_submodule(name)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    old, new = layer_tensors(tiny_gptq, name), layer_tensors(tmp_path / "out", name)
    # peft pools mean * n_chunks: dW = scaling * B A * n_chunks / chunk, per contiguous chunk of 32
    delta = (2.0 * (B @ A) * 4 / 32).T  # (G, out)
    z = naive_unpack(old[1], 4, 64, along_rows=False) + 1
    want = (z - torch.round(delta / old[2].float())).clamp(1, 15)
    assert torch.equal(naive_unpack(new[1], 4, 64, along_rows=False) + 1, want.long())


def test_peft_use_qalora_adapter_with_finer_chunks_is_refused(tiny_gptq, tmp_path):
    from peft import LoraConfig

    model = get_peft_model(load_gptq_model(tiny_gptq), LoraConfig(r=4, use_qalora=True, qalora_group_size=16,
                                                                   target_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="pools groups of 16 inputs .* groups of 32: the update is not constant"):
        merge_checkpoint(tiny_gptq, tmp_path / "peft", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refusals_before_writing(tiny_gptq_factory, tmp_path):
    folder = tiny_gptq_factory(4)
    adapter = _save(adapter_model(folder), tmp_path)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists; choose another folder or pass --overwrite"):
        merge_checkpoint(folder, adapter, tmp_path / "exists", progress=False)
    (tmp_path / "float").mkdir()
    (tmp_path / "float/config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="is not a GPTQ checkpoint .*peft-qalora quantize"):
        merge_checkpoint(tmp_path / "float", adapter, tmp_path / "o1", progress=False)
    other = tiny_gptq_factory(4, group_size=16)
    with pytest.raises(ValueError, match="cannot become zero points"):
        merge_checkpoint(other, adapter, tmp_path / "o2", progress=False)
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    next(v for k, v in tensors.items() if "qalora_B" in k)[0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_checkpoint(folder, adapter, tmp_path / "o3", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "exists", "float"]


def test_killed_merge_leaves_nothing_at_the_destination(tiny_gptq, tmp_path):
    adapter = _save(adapter_model(tiny_gptq), tmp_path)
    script = textwrap.dedent(f"""
        import time, peft_qalora.gptq.checkpoint as ck
        from peft_qalora.merge.files import merge_checkpoint
        real = ck.overwrite_tensors
        def slow(path, replacements):
            real(path, replacements)
            print("WROTE", flush=True)
            time.sleep(60)
        ck.overwrite_tensors = slow
        merge_checkpoint({str(tiny_gptq)!r}, {str(adapter)!r}, {str(tmp_path / "out")!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WROTE"  # a shard sits in the temporary folder now
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    stray = [p for p in tmp_path.glob("*") if p.name not in ("adapter",)]
    assert all(p.name.startswith(".out.partial-") for p in stray)  # hidden, beside, never inside a model folder
    assert [p.name for p in (tmp_path / "adapter").glob("*.safetensors")] == ["adapter_model.safetensors"]
