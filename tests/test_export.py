"""Exports to AWQ and compressed-tensors, checked against code we did not write: GPTQModel's AWQ
dequantization, the compressed-tensors package's decompressor, transformers' loaders, and the
dense float weight built from the GPTQ tensors by the naive reference."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from helpers.reference import dense_weight

from peft_qalora import export
from peft_qalora.exports.awq import pack_awq
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.packing import pack_cols, unpack_cols, unpack_rows

LAYER = "model.layers.0.mlp.down_proj"


def _dense_from_gptq(folder, name):
    t = ckpt.read_tensors(folder / "model.safetensors")
    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    return dense_weight(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], t[f"{name}.g_idx"], bits)


def test_awq_word_worked_by_hand():
    # columns 0..7 hold 1..8; AWQ slot i holds column [0, 2, 4, 6, 1, 3, 5, 7][i] -> nibbles 1,3,5,7,2,4,6,8
    word = pack_awq(torch.arange(1, 9, dtype=torch.int32).view(1, 8))
    assert word.item() == 0x86427531 - (1 << 32)


def test_awq_packing_matches_vllm_unpacking_order():
    # vLLM's _convert_awq_to_standard_format reads slot values then indexes [0, 4, 1, 5, 2, 6, 3, 7]
    values = torch.randint(0, 16, (5, 32), dtype=torch.int32)
    slots = unpack_cols(pack_awq(values), 4).view(5, 4, 8)
    assert torch.equal(slots[:, :, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(5, 32), values)


@pytest.mark.parametrize("bits", [4])
def test_awq_export_dequantizes_like_gptqmodel(tiny_gptq_factory, tmp_path, bits):
    src = tiny_gptq_factory(bits)
    summary = export(src, tmp_path / "awq", "awq", progress=False)
    assert summary["layers"] == 14
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                      "modules_to_not_convert": ["lm_head"]}
    t = ckpt.read_tensors(tmp_path / "awq" / "model.safetensors")
    awq = dequantize_gemm(t[f"{LAYER}.qweight"], t[f"{LAYER}.qzeros"], t[f"{LAYER}.scales"], 4, 32)  # (in, out)
    # GPTQModel multiplies in fp16: one rounding of the exact (q - z) * s, which our float32 product holds exactly
    torch.testing.assert_close(awq.T, _dense_from_gptq(src, LAYER).half(), rtol=0, atol=0)
    assert not (tmp_path / "awq" / "quantize_config.json").exists()
    assert (tmp_path / "awq" / "tokenizer.json").is_file()


@pytest.mark.parametrize("bits,act_order", [(2, False), (3, False), (4, False), (8, False), (4, True)])
def test_compressed_tensors_package_decompresses_to_our_weights(tiny_gptq_factory, tmp_path, bits, act_order):
    src = tiny_gptq_factory(bits, act_order=act_order)
    export(src, tmp_path / "ct", "compressed-tensors", progress=False)
    written = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(written)
    scheme = config.config_groups["group_0"]
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=32,
                               actorder="group" if act_order else None)
    package = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                 format="pack-quantized", quantization_status="compressed", ignore=config.ignore)
    assert written == package.model_dump(mode="json", exclude_none=False)  # what the package itself writes
    assert (scheme.weights.num_bits, scheme.weights.symmetric, config.format) == (bits, False, "pack-quantized")
    assert scheme.weights.actorder == ("group" if act_order else None)
    tensors = ckpt.read_tensors(tmp_path / "ct" / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", LAYER):
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        assert set(state) == set(PackedQuantizationCompressor.compression_param_names(scheme))
        dense = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        torch.testing.assert_close(dense, _dense_from_gptq(src, name).half(), rtol=0, atol=0)  # fp16, as above


def test_transformers_loads_awq_export_like_the_gptq_folder(tiny_gptq, tmp_path):
    from peft_qalora.evaluate import logits_on
    from peft_qalora.base.load import load_gptq_model
    from transformers import AutoModelForCausalLM

    export(tiny_gptq, tmp_path / "awq", "awq", progress=False)
    ids = torch.randint(0, 128, (2, 16))
    ours = logits_on(load_gptq_model(tiny_gptq, dtype=torch.float16), ids)
    awq = AutoModelForCausalLM.from_pretrained(tmp_path / "awq", dtype=torch.float16, device_map="cpu")
    assert "Awq" in type(awq.model.layers[0].mlp.down_proj).__name__
    torch.testing.assert_close(logits_on(awq, ids), ours, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("act_order", [False, True])
def test_transformers_loads_compressed_tensors_export(tiny_gptq_factory, tmp_path, act_order):
    from peft_qalora.evaluate import logits_on
    from peft_qalora.base.load import load_gptq_model
    from transformers import AutoModelForCausalLM

    src = tiny_gptq_factory(4, act_order=act_order)
    export(src, tmp_path / "ct", "compressed-tensors", progress=False)
    ids = torch.randint(0, 128, (2, 16))
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, device_map="cpu")
    # transformers decompresses to dense fp16-rounded weights: the GPTQ model in fp32 within that rounding
    torch.testing.assert_close(logits_on(ct, ids), logits_on(load_gptq_model(src), ids), rtol=1e-2, atol=1e-2)


def test_compressed_tensors_words_worked_by_hand(tiny_gptq, tmp_path):
    # one 4-bit row of codes 1..8 along the inputs: stored unsigned (signed + 8), first value lowest
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    assert pack_to_int32(torch.arange(1, 9, dtype=torch.int8).view(1, 8) - 8, 4).item() == 0x87654321 - (1 << 32)
    export(tiny_gptq, tmp_path / "ct", "compressed-tensors", progress=False)
    ct, gptq = ckpt.read_tensors(tmp_path / "ct" / "model.safetensors"), ckpt.read_tensors(tiny_gptq / "model.safetensors")
    codes = unpack_cols(ct[f"{LAYER}.weight_packed"], 4)  # (out, in): unsigned codes along the inputs
    assert torch.equal(codes.T, unpack_rows(gptq[f"{LAYER}.qweight"], 4))
    zeros = unpack_cols(ct[f"{LAYER}.weight_zero_point"].T.contiguous(), 4)  # packed along the outputs
    assert torch.equal(zeros, unpack_cols(gptq[f"{LAYER}.qzeros"], 4) + 1)  # true zeros; GPTQ v1 stores z - 1


@pytest.mark.parametrize("shape,match", [((64, 48, 32), "multiples of 32"), ((64, 64, 16), "group size 16")])
def test_awq_refuses_shapes_vllm_cannot_serve(shape, match):
    from peft_qalora.exports.awq import AWQFormat
    from peft_qalora.exports.stream import LayerInfo

    with pytest.raises(ValueError, match=match):
        AWQFormat().check(LayerInfo("layers.0.q_proj", 4, *shape, act_order=False))


def test_awq_refuses_before_writing(tiny_gptq_factory, tmp_path):
    for bits, act, match in [(3, False, "3-bit but AWQ holds only 4-bit"), (4, True, "act-order")]:
        with pytest.raises(ValueError, match=match):
            export(tiny_gptq_factory(bits, act_order=act), tmp_path / "out", "awq", progress=False)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_export_refuses_existing_output_and_non_gptq(tiny_gptq, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(tiny_gptq, tmp_path / "out", "awq")
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        export(tmp_path / "float", tmp_path / "x", "awq")
    with pytest.raises(ValueError, match="unknown format"):
        export(tiny_gptq, tmp_path / "y", "exl2")


def test_export_streams_shards_and_keeps_the_index(tiny_gptq, tmp_path):
    from peft_qalora.base.load import load_gptq_model
    from peft_qalora.base.save import save_quantized

    sharded = save_quantized(load_gptq_model(tiny_gptq), tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2
    export(sharded, tmp_path / "ct", "compressed-tensors", progress=False)
    assert sorted(p.name for p in (tmp_path / "ct").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "ct" / ckpt.INDEX_NAME).read_text())["weight_map"]
    for key, shard in index.items():
        assert key in ckpt.tensor_names(tmp_path / "ct" / shard)



@pytest.mark.parametrize("zero_format", [1, 2])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_words_are_the_unpacked_zeros_packed_again(bits, zero_format):
    """The exports take zero words straight from qzeros; the reference unpacks every field as GPTQModel reads it
    (v1 fields of 2^bits - 1 included, whose word add carries) and packs the zeros again."""
    from peft_qalora.exports.awq import awq_qzeros
    from peft_qalora.exports.compressed_tensors import weight_zero_point, zero_point_of
    from peft_qalora.gptq.tensors import QuantTensors

    n_groups, out = 6, 64
    fields = torch.randint(0, 1 << bits, (n_groups, out), dtype=torch.int32)
    fields[0, :8] = (1 << bits) - 1  # a carrying v1 word
    qt = QuantTensors(torch.zeros(64 * bits // 32, out, dtype=torch.int32), pack_cols(fields, bits),
                      torch.ones(n_groups, out, dtype=torch.float16), torch.arange(64, dtype=torch.int32) // 11, bits,
                      zero_format)
    assert torch.equal(zero_point_of("layer", qt), weight_zero_point(qt.zeros(), bits))
    if bits == 4:
        assert torch.equal(awq_qzeros(qt), pack_awq(qt.zeros()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_packing_shortcuts_match_the_package(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from peft_qalora.exports.compressed_tensors import weight_packed, weight_zero_point
    from peft_qalora.gptq.rtn import rtn_quantize

    qt = rtn_quantize(torch.randn(96, 128), bits, 32)
    offset = 1 << (bits - 1)
    want = pack_to_int32((qt.codes().T - offset).to(torch.int8).contiguous(), bits)
    assert torch.equal(weight_packed(qt), want)
    zeros = torch.randint(0, 1 << bits, (3, 96), dtype=torch.int32)
    want = pack_to_int32((zeros.T - offset).to(torch.int8).contiguous(), bits, packed_dim=0)
    assert torch.equal(weight_zero_point(zeros, bits), want)


def test_awq_qweight_moves_bytes_as_pack_awq_packs_codes():
    from peft_qalora.exports.awq import awq_qweight
    from peft_qalora.gptq.rtn import rtn_quantize

    qt = rtn_quantize(torch.randn(64, 96), 4, 32)  # (out, in)
    assert torch.equal(awq_qweight(qt), pack_awq(qt.codes()))


def test_streamed_shard_is_byte_for_byte_what_save_file_writes(tmp_path):
    from safetensors.torch import save_file

    from peft_qalora.gptq.header import read_header
    from peft_qalora.gptq.streaming import DTYPE_NAMES, ShardWriter

    tensors = {"b.qweight": torch.randint(-9, 9, (4, 6), dtype=torch.int32), "a.scales": torch.rand(2, 3).half(),
               "a.g_idx": torch.arange(5, dtype=torch.int32), "shape": torch.tensor([3, 4]), "n": torch.rand(3),
               "bf": torch.rand(2).bfloat16(), "u": torch.arange(3, dtype=torch.uint8), "e": torch.zeros(0, 2)}
    save_file(tensors, str(tmp_path / "want.safetensors"), metadata={"format": "pt"})
    copied = read_header(tmp_path / "want.safetensors", "")  # copy two tensors from there, write the rest
    specs = {k: (DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in tensors.items()}
    with ShardWriter(tmp_path / "got.safetensors", specs, {"format": "pt"}) as writer:
        for key in reversed(list(tensors)):
            writer.copy(key, copied[key]) if key in ("n", "b.qweight") else writer.write(key, tensors[key])
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="never written"), ShardWriter(tmp_path / "x.safetensors", specs) as writer:
        writer.write("n", tensors["n"])
    with pytest.raises(ValueError, match=r"tensor n: got F16 \[3\], laid out as F32 \[3\]"):
        ShardWriter(tmp_path / "y.safetensors", specs).write("n", tensors["n"].half())
