"""A corpus of broken and lying folders, each run through every command that reads it.

Every case must end in our own message (owner-prefixed, naming the file, the tensor and the fix),
never in a traceback from deep inside a library, and leave nothing behind in the output folder.
Base folders go through `merge`, `merge --format awq`, `export --format awq`, `export-lora`, `train`,
`verify` and `load_gptq_model` (both kernels); adapter folders through `merge`, `export-lora` and
`PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.cli import main
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.validate import check_checkpoint

LAYER = "model.layers.0.mlp.down_proj"  # 128 inputs in 4 groups of 32, 64 outputs
OWNERS = re.compile(r"^(error: )?(gptq\.validate|quantized|adapters|QALoraModel|merge|export [\w-]+):")
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


# ------------------------------------------------------------------------------------ folder surgery


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_quant(folder: Path, **changes) -> None:
    edit_json(folder / "config.json", lambda c: c["quantization_config"].update(changes))


def edit_tensors(path: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def edit_layer(folder: Path, suffix: str, change: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
    def apply(tensors):
        key = f"{LAYER}.{suffix}"
        new = change(tensors[key])
        if new is None:
            del tensors[key]
        else:
            tensors[key] = new
    edit_tensors(folder / "model.safetensors", apply)


def read_raw(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    header, data = read_raw(path)
    change(header)
    write_raw(path, header, data)


def split_in_two(folder: Path) -> None:
    """model.safetensors -> two shards and an index, the layout a downloaded large model has."""
    tensors = load_file(folder / "model.safetensors")
    keys = sorted(tensors)
    halves = {SHARD1: keys[: len(keys) // 2], SHARD2: keys[len(keys) // 2:]}
    for name, part in halves.items():
        ckpt.write_shard(folder / name, {k: tensors[k] for k in part})
    (folder / "model.safetensors").unlink()
    ckpt.write_index(folder, {k: n for n, part in halves.items() for k in part}, 0)


def edit_index(folder: Path, change: Callable[[dict], None]) -> None:
    split_in_two(folder)
    edit_json(folder / ckpt.INDEX_NAME, lambda index: change(index["weight_map"]))


def first_key_of(folder: Path, shard: str) -> str:
    return sorted(read_raw(folder / shard)[0].keys() - {"__metadata__"})[0]


def move_outside(folder: Path, shard: str) -> Path:
    outside = folder.parent / "elsewhere.safetensors"
    shutil.move(folder / shard, outside)
    return outside


def point_shard(folder: Path, name: str) -> None:
    """The second shard's tensors listed under `name` in the index."""
    split_in_two(folder)
    move_outside(folder, SHARD2)
    edit_json(folder / ckpt.INDEX_NAME, lambda index: index["weight_map"].update(
        {k: name for k, v in index["weight_map"].items() if v == SHARD2}))


def link_shard_outside(folder: Path) -> None:
    split_in_two(folder)
    os.symlink(move_outside(folder, SHARD2), folder / SHARD2)


def link_side_file_outside(folder: Path) -> None:
    secret = folder.parent / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "tokenizer_config.json").unlink()
    os.symlink(secret, folder / "tokenizer_config.json")


def duplicate_tensor(folder: Path) -> None:
    split_in_two(folder)
    key = first_key_of(folder, SHARD1)
    copy = load_file(folder / SHARD1)[key]
    edit_tensors(folder / SHARD2, lambda t: t.update({key: copy}))


def truncate(path: Path, n: int = 1000) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def overlap(header: dict) -> None:
    """The later of two same-shape tensors claims the earlier one's bytes."""
    shape = header[f"{LAYER}.qzeros"]["shape"]
    same = [k for k in header if k != "__metadata__" and header[k]["shape"] == shape and k.endswith(".qzeros")]
    a, b = sorted(same, key=lambda k: header[k]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]


def header_length(path: Path, length: int) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = length.to_bytes(8, "little")
    path.write_bytes(bytes(data))


def garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    data[8:8 + length] = b"\xff" * length
    path.write_bytes(bytes(data))


def float_weights_with_gptq_config(folder: Path) -> None:
    def dequantize(tensors):
        for name in {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}:
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                del tensors[f"{name}.{suffix}"]
            tensors[f"{name}.weight"] = torch.zeros(1, 1)
    edit_tensors(folder / "model.safetensors", dequantize)


def rename_prefix(folder: Path) -> None:
    edit_tensors(folder / "model.safetensors", lambda t: t.update(
        {k.replace("model.layers.", "model.blocks."): t.pop(k) for k in list(t) if "model.layers." in k}))


def custom_architecture(folder: Path) -> None:
    edit_json(folder / "config.json", lambda c: c.update(
        model_type="qalora_custom_arch", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}))
    (folder / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/pwned')\n")


def missing_shard(folder: Path) -> None:
    split_in_two(folder)
    (folder / SHARD2).unlink()


def broken_index(folder: Path) -> None:
    split_in_two(folder)
    (folder / ckpt.INDEX_NAME).write_text("{")


def no_quantization_config(folder: Path) -> None:
    (folder / "quantize_config.json").unlink()
    edit_json(folder / "config.json", lambda c: c.pop("quantization_config"))


def wrong_bias(folder: Path) -> None:
    edit_tensors(folder / "model.safetensors", lambda t: t.update({f"{LAYER}.bias": torch.zeros(63).half()}))


def pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never opened


def set_g_idx(index: int, value: int):
    def change(g):
        g = g.clone()
        g[index] = value
        return g
    return change


def set_scale(value: float):
    def change(s):
        s = s.clone()
        s[1, 3] = value
        return s
    return change


@dataclass
class Case:
    id: str
    build: Callable[[Path], None]
    match: str
    commands: tuple[str, ...] = ("merge", "merge-awq", "export", "export-lora", "train", "verify", "load")


FILES = [
    Case("shard-absolute-path", lambda f: point_shard(f, str(f.parent / "elsewhere.safetensors")),
         "not a plain file name: an absolute path or `..`"),
    Case("shard-dotdot", lambda f: point_shard(f, "../elsewhere.safetensors"), "not a plain file name"),
    Case("shard-in-subfolder", lambda f: point_shard(f, "sub/model.safetensors"), "not a plain file name"),
    Case("shard-not-safetensors", lambda f: point_shard(f, "tokenizer.json"), r"shards are \*\.safetensors"),
    Case("shard-links-outside", link_shard_outside, r"is a link to .*elsewhere.safetensors, outside the model folder"),
    Case("side-file-links-outside", link_side_file_outside, r"tokenizer_config.json is a link to .*id_rsa, outside"),
    Case("shard-missing", missing_shard, f"lists the shard {SHARD2} but .* no such file"),
    Case("index-names-unheld-tensor", lambda f: edit_index(f, lambda m: m.update({"model.layers.9.q.qweight": SHARD1})),
         r"tensor model.layers.9.q.qweight is in .*, but no shard holds it"),
    Case("index-wrong-shard", lambda f: edit_index(f, lambda m: m.update({first_key_of(f, SHARD2): SHARD1})),
         f"is in {SHARD1}, but it is in {SHARD2}"),
    Case("index-misses-tensor", lambda f: edit_index(f, lambda m: m.pop(first_key_of(f, SHARD2))),
         "holds 1 tensors that model.safetensors.index.json does not list"),
    Case("tensor-in-two-shards", duplicate_tensor, f"is stored twice, in {SHARD1} and {SHARD2}"),
    Case("index-not-json", broken_index, "model.safetensors.index.json is not valid JSON"),
    Case("pickle-only", pickle_only, r"pytorch_model.bin.*never loads pickles"),
]
HEADERS = [
    Case("header-length-huge", lambda f: header_length(f / "model.safetensors", 1 << 40),
         r"declares a 1,099,511,627,776-byte header"),
    Case("header-length-past-file", lambda f: header_length(f / "model.safetensors", (f / "model.safetensors")
                                                           .stat().st_size), "truncated, or not a safetensors file"),
    Case("header-not-json", lambda f: garbage_header(f / "model.safetensors"), "header of .* is not valid JSON"),
    Case("shard-truncated", lambda f: truncate(f / "model.safetensors"), "the file is truncated"),
    Case("offsets-past-end", lambda f: edit_header(f / "model.safetensors", lambda h: h[f"{LAYER}.g_idx"].update(
        data_offsets=[h[f"{LAYER}.g_idx"]["data_offsets"][0], 10**9])), rf"tensor {LAYER}.g_idx: its bytes end at"),
    Case("ranges-overlap", lambda f: edit_header(f / "model.safetensors", overlap), "overlaps the tensor before it"),
    Case("shape-vs-bytes", lambda f: edit_header(f / "model.safetensors", lambda h: h[f"{LAYER}.qzeros"].update(
        shape=[4, 9])), r"qzeros: I32 \[4, 9\] takes 144 bytes but the header gives it 128"),
    Case("unknown-dtype", lambda f: edit_header(f / "model.safetensors", lambda h: h[f"{LAYER}.scales"].update(
        dtype="F7")), "unknown dtype 'F7'"),
]
CONFIGS = [
    Case("no-quantization-config", no_quantization_config, "is not a GPTQ checkpoint .*peft-qalora quantize"),
    Case("autogptq-layout", lambda f: edit_json(f / "config.json", lambda c: c.pop("quantization_config")),
         'older AutoGPTQ layout.*"quant_method": "gptq"'),
    Case("awq-method", lambda f: edit_quant(f, quant_method="awq"), "quant_method='awq'"),
    Case("config-not-json", lambda f: (f / "config.json").write_text("{'bits': 4}"), "config.json is not valid JSON"),
    Case("bits-5", lambda f: edit_quant(f, bits=5), "has bits=5; GPTQ stores 2, 3, 4 or 8 bits"),
    Case("bits-string", lambda f: edit_quant(f, bits="4"), "has bits='4'"),
    Case("group-size-0", lambda f: edit_quant(f, group_size=0), "group_size=0; GPTQ takes a positive"),
    Case("group-size-disagrees", lambda f: edit_quant(f, group_size=64),
         "scales has 4 groups but 128 inputs in groups of 64 .* make 2; the config and the tensors disagree"),
    Case("group-size-not-dividing", lambda f: edit_quant(f, group_size=48), "not a whole number of groups"),
    Case("bits-disagree", lambda f: edit_quant(f, bits=8), r"qweight is \[16, 64\] but 8-bit codes .* take \[32, 64\]"),
    Case("unknown-checkpoint-format", lambda f: edit_quant(f, checkpoint_format="marlin"), "checkpoint_format='marlin'"),
    Case("dynamic-overrides", lambda f: edit_quant(f, dynamic={"-:.*down_proj": {}}), "`dynamic` per-module"),
    Case("block-name-lie", lambda f: edit_quant(f, block_name_to_quantize="model.layers.0"),
         r"block_name_to_quantize='model.layers.0', which leaves model.layers.1.* would load it with random weights"),
    Case("modules-in-block-lie", lambda f: edit_quant(f, modules_in_block_to_quantize=[["self_attn.q_proj"]]),
         "modules_in_block_to_quantize=.*Remove modules_in_block_to_quantize"),
    Case("float-weights-gptq-config", float_weights_with_gptq_config, r"no shard holds a \*\.qweight tensor"),
]
TENSORS = [
    Case("qweight-float", lambda f: edit_layer(f, "qweight", lambda t: t.float()), "qweight is F32; GPTQ stores it as I32"),
    Case("qzeros-shape", lambda f: edit_layer(f, "qzeros", lambda t: t[:, :4]),
         r"qzeros is \[4, 4\] but 4-bit zeros of 64 outputs take \[4, 8\]"),
    Case("scales-int", lambda f: edit_layer(f, "scales", lambda t: t.to(torch.int32)), "scales is I32"),
    Case("scales-rows", lambda f: edit_layer(f, "scales", lambda t: t[:3]), r"qzeros is \[4, 8\] but .* take \[3, 8\]"),
    Case("g_idx-missing", lambda f: edit_layer(f, "g_idx", lambda t: None), rf"has no {LAYER}.g_idx"),
    Case("g_idx-int64", lambda f: edit_layer(f, "g_idx", lambda t: t.long()), "g_idx is I64"),
    Case("g_idx-out-of-range", lambda f: edit_layer(f, "g_idx", set_g_idx(5, 4)),
         r"g_idx\[5\] = 4, outside the layer's groups \[0, 4\)"),
    Case("g_idx-negative", lambda f: edit_layer(f, "g_idx", set_g_idx(0, -1)), r"g_idx\[0\] = -1"),
    Case("g_idx-unequal-groups", lambda f: edit_layer(f, "g_idx", set_g_idx(0, 1)),
         "puts 31 inputs in group 0, but every GPTQ group holds exactly group_size=32"),
    Case("scales-zero", lambda f: edit_layer(f, "scales", set_scale(0.0)), r"scales\[1, 3\] = 0.0 .*finite and non-zero"),
    Case("scales-nan", lambda f: edit_layer(f, "scales", set_scale(float("nan"))), r"scales\[1, 3\] = nan"),
    Case("scales-inf", lambda f: edit_layer(f, "scales", set_scale(float("-inf"))), r"scales\[1, 3\] = -inf"),
    Case("bias-shape", wrong_bias, r"bias is \[63\], expected \[64\]"),
]
LOADERS = ("load", "train", "verify")
LOAD_ONLY = [  # consistent files our file commands handle; transformers would build a model of random weights
    Case("tensor-names-match-no-module", rename_prefix,
         "did not load .* as stored: 14 quantized linears of the files have no quantized module .* random weights", LOADERS),
    Case("custom-code-architecture", custom_architecture, "model_type='qalora_custom_arch'.*never runs code", LOADERS),
]
BASE_CASES = FILES + HEADERS + CONFIGS + TENSORS + LOAD_ONLY


@pytest.fixture(scope="module")
def good(tiny_gptq_factory, tmp_path_factory):
    """A healthy base, an adapter trained-by-construction on it (exact, trained scales), a text file."""
    base = tiny_gptq_factory(4)
    root = tmp_path_factory.mktemp("good")
    model = get_peft_model(load_gptq_model(base), QALoraConfig(r=2, init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 8)
    return {"base": base, "adapter": root / "adapter", "text": root / "text.txt"}


def run(command: str, good: dict, out: Path, base=None, adapter=None) -> None:
    """One command on a (possibly broken) base or adapter; raises what the user would see."""
    base, adapter = str(base or good["base"]), str(adapter or good["adapter"])
    argv = {
        "merge": ["merge", "--base", base, "--adapter", adapter, "--out", str(out / "merged")],
        "merge-awq": ["merge", "--base", base, "--adapter", adapter, "--out", str(out / "awq"), "--format", "awq"],
        "export": ["export", base, str(out / "exported"), "--format", "awq"],
        "export-lora": ["export-lora", adapter, str(out / "lora"), "--base", base],
        "train": ["train", base, str(out / "trained"), "--text", str(good["text"]), "--steps", "1", "--seq-len", "16",
                  "--batch-size", "1"],
        "verify": ["verify", base, "--base", str(good["base"]), "--adapter", adapter],
    }.get(command)
    if argv is not None:
        return main(argv)
    if command == "load":
        for trainable in (False, True):
            load_gptq_model(base, trainable=trainable)
    elif command == "peft":
        PeftModel.from_pretrained(load_gptq_model(base), adapter)


def expect_refusal(command: str, good: dict, out: Path, match: str, **where) -> None:
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as caught:
        run(command, good, out, **where)
    message = str(caught.value)
    assert OWNERS.match(message), f"{command}: not our message: {message}"
    assert re.search(match, message, re.S), f"{command}: {message!r} does not match {match!r}"
    assert not list(out.iterdir()), f"{command} left {list(out.iterdir())}"


@pytest.mark.parametrize("case", BASE_CASES, ids=lambda c: c.id)
def test_broken_base_is_refused_by_every_command(case, good, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(good["base"], folder)
    case.build(folder)
    (tmp_path / "out").mkdir()
    for command in case.commands:
        expect_refusal(command, good, tmp_path / "out", case.match, base=folder)
    assert not (tmp_path / "pwned").exists() and not Path("/tmp/pwned").exists()


# ------------------------------------------------------------------------------------------- adapters


def adapter_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda a: edit_tensors(a / "adapter_model.safetensors", change)


def adapter_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda a: edit_json(a / "adapter_config.json", change)


def key(role: str, layer: str = LAYER) -> str:
    return f"base_model.model.{layer}.{role}" + ("" if role == "qalora_scale" else ".weight")


def resize(role: str, shape: tuple, also: dict | None = None):
    def change(t):
        for r, s in {role: shape, **(also or {})}.items():
            t[key(r)] = torch.zeros(s)
    return adapter_tensors(change)


def poison(role: str, value: float):
    def change(t):
        t[key(role)][0, 0] = value
    return adapter_tensors(change)


@dataclass
class AdapterCase:
    id: str
    build: Callable[[Path], None]
    file_match: str  # merge and export-lora (adapters.read_adapter)
    peft_match: str | None  # PeftModel.from_pretrained (QALoraConfig.from_pretrained and the load hook)
    commands: tuple[str, ...] = field(default=("merge", "export-lora", "peft"))


ADAPTER_CASES = [
    AdapterCase("missing-B", adapter_tensors(lambda t: t.pop(key("qalora_B"))), rf"has no {LAYER}.qalora_B",
                rf"lacks 1 of the adapter tensors .*{LAYER}.qalora_B.default.weight"),
    AdapterCase("extra-tensor", adapter_tensors(lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2)})),
                "holds base_model.model.lm_head.weight, which is not a qalora_A / qalora_B tensor",
                r"holds 1 tensors that are not this adapter's \(e.g. base_model.model.lm_head.weight\)"),
    AdapterCase("A-groups-vs-base", resize("qalora_A", (2, 8), {"qalora_scale": (8, 64)}),
                r"pools groups of 32 inputs \(8 groups\) but the base layer has 128 inputs", r"has shape \((2, 8|8, 64)\)",
                ("merge", "peft")),  # export-lora refuses an adapter with trained scales first
    AdapterCase("B-outputs-vs-base", resize("qalora_B", (32, 2), {"qalora_scale": (4, 32)}),
                "has 32 outputs but the base layer has 64", r"has shape \((32, 2|4, 32)\) but this base needs",
                ("merge", "peft")),
    AdapterCase("rank-vs-config", resize("qalora_A", (3, 4)), r"with r=2 they must be \[r, groups\]",
                r"has shape \(3, 4\)"),
    AdapterCase("scale-shape", resize("qalora_scale", (4, 32)), r"qalora_scale is \[4, 32\] but qalora_B has 64",
                r"has shape \(4, 32\)"),
    AdapterCase("int-tensor", adapter_tensors(lambda t: t.update({key("qalora_A"): t[key("qalora_A")].int()})),
                "expected a 2-D float tensor", "is torch.int32, not a float tensor"),
    AdapterCase("nan", poison("qalora_B", float("nan")), r"qalora_B holds NaN or Inf", "holds NaN or Inf"),
    AdapterCase("inf-scale", poison("qalora_scale", float("inf")), r"qalora_scale holds NaN or Inf", "NaN or Inf"),
    AdapterCase("unknown-key", adapter_config(lambda c: c.update(use_qadora=True)),
                r"does not know: \['use_qadora'\] \(written by a newer version\?\)", r"\['use_qadora'\]"),
    AdapterCase("r-string", adapter_config(lambda c: c.update(r="2")), "has r='2' \\(str\\); expected int", "r='2'"),
    AdapterCase("alpha-list", adapter_config(lambda c: c.update(lora_alpha=[16])), r"lora_alpha=\[16\]",
                r"lora_alpha=\[16\]"),
    AdapterCase("strategy-unknown", adapter_config(lambda c: c.update(merge_strategy="magic")),
                "merge_strategy='magic'", "merge_strategy='magic'"),
    AdapterCase("config-not-json", lambda a: (a / "adapter_config.json").write_text("{"), "is not valid JSON", None,
                ("merge", "export-lora")),  # peft reads the JSON (for peft_type) before any hook of ours
    AdapterCase("plain-lora", adapter_config(lambda c: c.update(peft_type="LORA")), "LORA adapter without use_qalora",
                None, ("merge", "export-lora")),  # peft loads a plain LoRA itself: not ours to refuse
    AdapterCase("weights-truncated", lambda a: truncate(a / "adapter_model.safetensors", 64),
                "the file is truncated .*Save the adapter again", "the file is truncated .*Save the adapter again"),
    AdapterCase("weights-header-huge", lambda a: header_length(a / "adapter_model.safetensors", 1 << 40),
                "declares a 1,099,511,627,776-byte header", "declares a"),
    AdapterCase("pickle-only", lambda a: ((a / "adapter_model.safetensors").rename(a / "adapter_model.bin")),
                "adapter_model.bin is a pickle, which peft-qalora never loads", "never loads"),
]


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda c: c.id)
def test_broken_adapter_is_refused_by_every_command(case, good, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(good["adapter"], adapter)
    case.build(adapter)
    (tmp_path / "out").mkdir()
    for command in case.commands:
        match = case.peft_match if command == "peft" else case.file_match
        expect_refusal(command, good, tmp_path / "out", match, adapter=adapter)


def test_corpus_size():
    """The counts the issue asks for: broken inputs and the command runs that refused them."""
    runs = sum(len(c.commands) for c in BASE_CASES) + sum(len(c.commands) for c in ADAPTER_CASES)
    assert (len(BASE_CASES), len(ADAPTER_CASES), runs) == (51, 18, 399)


# ------------------------------------------------------------------------- what is accepted, and why


def test_no_public_loader_returns_a_model_with_missing_weights(good, tmp_path, monkeypatch):
    """The issue's report, reproduced: a quantization_config that quantizes nothing makes transformers build
    float linears, every qweight UNEXPECTED and every weight MISSING, and return the model. Ours refuses twice:
    before loading (the config against the files) and after (the model against the files)."""
    from transformers import AutoModelForCausalLM

    from peft_qalora.gptq import validate
    from peft_qalora.base.load import gptq_linear_names

    folder = tmp_path / "base"
    shutil.copytree(good["base"], folder)
    edit_quant(folder, block_name_to_quantize="transformer.h")
    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", output_loading_info=True)
    assert not gptq_linear_names(model)
    assert len(info["missing_keys"]) == 14 and all(k.endswith(".weight") for k in info["missing_keys"])
    assert sum(k.endswith(".qweight") for k in info["unexpected_keys"]) == 14
    for trainable in (False, True):
        with pytest.raises(ValueError, match="gptq.validate: .*block_name_to_quantize='transformer.h'"):
            load_gptq_model(folder, trainable=trainable)
    monkeypatch.setattr(validate, "_check_quantized_modules", lambda checkpoint: None)
    for trainable in (False, True):
        with pytest.raises(ValueError, match="quantized: transformers did not load .* 14 quantized linears of the "
                                             "files have no quantized module .* 14 weights were freshly initialised"):
            load_gptq_model(folder, trainable=trainable)
    with pytest.raises(ValueError, match="trust_remote_code=True is refused"):
        load_gptq_model(good["base"], trust_remote_code=True)
    model, info = load_gptq_model(good["base"], trainable=False, output_loading_info=True)
    assert len(gptq_linear_names(model)) == 14 and not info["missing_keys"] and not info["unexpected_keys"]


def build_per_channel(folder: Path) -> Path:
    """The tiny LLaMA quantized per output channel (group_size -1: one group of all inputs per layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.tiny import TINY, tiny_tokenizer
    from peft_qalora.gptq.rtn import rtn_quantize

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            qt = rtn_quantize(module.weight.data, 4, module.in_features)
            tensors.update({f"{name}.{s}": getattr(qt, s) for s in ("qweight", "qzeros", "scales", "g_idx")})
    tensors.update({k: v.half() for k, v in model.state_dict().items() if k.rpartition(".")[0] + ".qweight" not in tensors})
    folder.mkdir()
    ckpt.write_shard(folder / "model.safetensors", tensors)
    ckpt.write_configs(folder, {**model.config.to_dict(), "dtype": "float16"},
                       ckpt.output_quant_config({"bits": 4, "group_size": -1, "desc_act": False}))
    tiny_tokenizer().save_pretrained(folder)
    return folder


def per_channel_adapter(base: Path, folder: Path) -> Path:
    """A QA-LoRA adapter in the only shape a per-channel base allows: A (r, 1), B (out, r)."""
    tensors = {}
    for name in check_checkpoint(base).layers.values():
        tensors[key("qalora_A", name.name)] = torch.full((2, 1), 0.01)
        tensors[key("qalora_B", name.name)] = torch.full((name.out_features, 2), 0.01)
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "QALORA", "r": 2, "lora_alpha": 2, "merge_strategy": "nearest", "train_scales": False}))
    return folder


def test_per_channel_loads_and_merges_but_training_and_exports_say_why(good, tmp_path, capsys):
    base = build_per_channel(tmp_path / "per-channel")
    assert check_checkpoint(base).per_channel
    model = load_gptq_model(base, trainable=False)  # loads and runs
    assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()
    with pytest.raises(ValueError, match="QALoraModel: the model is quantized per channel .* one number per output "
                                         "column .* --group-size 128"):
        get_peft_model(load_gptq_model(base), QALoraConfig(r=2))
    out = tmp_path / "out"
    out.mkdir()
    expect_refusal("train", good, out, "QALoraModel: the model is quantized per channel", base=base)
    for command in ("export", "merge-awq"):
        expect_refusal(command, good, out, "export awq: .* is quantized per channel .*grouped layouts", base=base)
    adapter = per_channel_adapter(base, tmp_path / "adapter")
    main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out / "merged")])
    assert "merged 14 layers (4-bit, strategy nearest, gptq)" in capsys.readouterr().out
    assert check_checkpoint(out / "merged").per_channel


def test_legal_but_unusual_folders_are_accepted(good, tmp_path, capsys):
    """Negative scales (quantize.py's mirrored grid), bf16 scales, shards, a Hugging Face cache snapshot."""
    negative, bf16, sharded = (tmp_path / n for n in ("negative", "bf16", "sharded"))
    for folder in (negative, bf16, sharded):
        shutil.copytree(good["base"], folder)
    edit_layer(negative, "scales", lambda s: -s)
    edit_layer(bf16, "scales", lambda s: s.bfloat16())
    split_in_two(sharded)
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in good["base"].iterdir():  # the layout huggingface_hub writes: links into ../../blobs
        shutil.copy(path, repo / "blobs" / path.name)
        os.symlink(Path("../../blobs") / path.name, repo / "snapshots" / "abc123" / path.name)
    snapshot = repo / "snapshots" / "abc123"
    for folder in (negative, bf16, sharded, snapshot):
        check_checkpoint(folder)
    for folder in (negative, sharded, snapshot):
        main(["merge", "--base", str(folder), "--adapter", str(good["adapter"]), "--out", str(tmp_path / "m" / folder.name)])
    assert (tmp_path / "m" / "sharded" / ckpt.INDEX_NAME).is_file()
    assert not (tmp_path / "m" / "abc123" / "tokenizer.json").is_symlink()
    with pytest.raises(SystemExit, match=r"merge: the adapter trained the fp16 scales of .* stores them as BF16"):
        main(["merge", "--base", str(bf16), "--adapter", str(good["adapter"]), "--out", str(tmp_path / "m" / "bf16")])
    assert not (tmp_path / "m" / "bf16").exists()


def test_adapter_config_schema_is_the_config_class():
    """adapters.py names QALoraConfig's keys itself (the file merge never imports peft): keep them equal."""
    import dataclasses

    from peft_qalora.merge import adapters
    from peft_qalora.tuners.qalora import config

    assert set(adapters.QALORA_CONFIG_TYPES) == {f.name for f in dataclasses.fields(config.QALoraConfig)}


def test_folder_checks_never_import_torch():
    import subprocess
    import sys

    code = "import sys, peft_qalora.gptq.folders, peft_qalora.gptq.validate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
