"""Security and safety, round two: each class of issue 21, built in the test, and what it ends in.

1. nothing runs from the user's current folder (a GGUF export run from a folder holding `json.py`, planted
   packages and a `.cache/` with a fake converter);
2. nothing outside an input folder reaches an output (links at any depth, tokenizer files named by path);
3. outside files are refused before they are read (a link to a named pipe would hang a reader);
4. llama.cpp's converter is shown only the checked files (a stray shard, a pipe);
5. no output may be, contain or lie inside an input, with or without --overwrite;
6. no success that writes a broken model (extreme scales, a NaN config);
7. our one-line message, never a traceback, names escaped; a hypothesis fuzz over headers and configs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_qalora.utils.atomic import check_apart
from peft_qalora.cli import error_line, main
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.inputs import shown
from peft_qalora.gptq.validate import check_checkpoint

CLI = str(Path(sys.executable).parent / "peft-qalora")  # the console script: what a user runs


def cli_error(argv: list[str]) -> str:
    """The message `main` exits with; fails if it returns or raises anything but SystemExit."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "Traceback" not in message, message
    return message


@pytest.fixture
def base(tiny_gptq, tmp_path) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(tiny_gptq, folder)
    return folder


@pytest.fixture
def adapter(tiny_gptq_factory, tmp_path_factory) -> Path:
    """A QA-LoRA adapter (exact, trained scales) on the tiny base, non-identity."""
    from peft import get_peft_model

    from peft_qalora import QALoraConfig, load_gptq_model

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model = get_peft_model(load_gptq_model(tiny_gptq_factory(4)), QALoraConfig(r=4, merge_strategy="exact"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.01)
    model.save_pretrained(folder)
    return folder


def outside_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- secret-bytes\n")
    return secret


# ------------------------------------------------------------------ 2, 3: links, pipes, hard links, named files


def test_a_link_below_the_top_level_is_refused_naming_it(base, tmp_path):
    (base / "additional_chat_templates").mkdir()
    os.symlink(outside_secret(tmp_path), base / "additional_chat_templates" / "x.jinja")
    with pytest.raises(ValueError, match=r"gptq.validate: .*additional_chat_templates/x.jinja is a link to .*outside "
                                         r"the model folder"):
        check_checkpoint(base)
    message = cli_error(["export", str(base), str(tmp_path / "out.gguf"), "--format", "gguf"])
    assert "x.jinja" in message and "secret-bytes" not in message
    assert not (tmp_path / "out.gguf").exists()


def test_a_link_inside_the_folder_is_fine(base):
    (base / "templates").mkdir()
    (base / "templates" / "a.jinja").write_text("{{ messages }}")
    os.symlink("a.jinja", base / "templates" / "b.jinja")
    os.symlink("templates", base / "alias")  # a folder link that stays inside
    check_checkpoint(base)


def test_config_linked_to_a_pipe_elsewhere_is_refused_unread(base, tmp_path):
    """Reading a named pipe blocks forever: a refusal (not a hang) shows the link was checked before reading."""
    pipe = tmp_path / "outside-pipe"
    os.mkfifo(pipe)
    (base / "config.json").unlink()
    os.symlink(pipe, base / "config.json")
    message = cli_error(["merge", "--base", str(base), "--adapter", str(base), "--out", str(tmp_path / "m")])
    assert "config.json is a link to" in message and "outside the model folder" in message


@pytest.mark.parametrize("kind", ["fifo", "loop", "broken", "hardlink"])
def test_entries_that_are_not_plain_files_are_refused(base, tmp_path, kind):
    sub = base / "extra"
    sub.mkdir()
    if kind == "fifo":
        os.mkfifo(sub / "model-00009.safetensors")
        expected = "is a named pipe"
    elif kind == "loop":
        os.symlink("b", sub / "a")
        os.symlink("a", sub / "b")
        expected = "is a link loop"
    elif kind == "broken":
        os.symlink("nowhere", sub / "a")
        expected = "is a broken link"
    else:
        os.link(outside_secret(tmp_path), sub / "tokenizer.model")
        expected = r"is a hard link \(2 names"
    with pytest.raises(ValueError, match=rf"gptq.validate: .*extra/\w.* {expected}"):
        check_checkpoint(base)


def test_tokenizer_config_naming_a_file_by_path_is_refused_before_train(base, tmp_path):
    secret = outside_secret(tmp_path)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["tokenizer_file"] = os.path.relpath(secret, Path.cwd())
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    message = cli_error(["train", str(base), str(tmp_path / "out"), "--steps", "1"])
    assert "tokenizer_config.json names files by path (tokenizer_file=" in message
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_a_float_folder_with_a_link_outside(tmp_path):
    model = tmp_path / "float"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    (model / "nested").mkdir()
    os.symlink(outside_secret(tmp_path), model / "nested" / "vocab.txt")
    message = cli_error(["quantize", str(model), str(tmp_path / "q")])
    assert message.startswith("error: quantize: ") and "nested/vocab.txt is a link to" in message
    assert not (tmp_path / "q").exists()


def test_adapter_folder_with_a_link_outside_is_refused(base, adapter, tmp_path):
    hostile = tmp_path / "adapter"
    shutil.copytree(adapter, hostile)
    os.symlink(outside_secret(tmp_path), hostile / "notes.txt")
    message = cli_error(["merge", "--base", str(base), "--adapter", str(hostile), "--out", str(tmp_path / "m")])
    assert message.startswith("error: adapters: ") and "notes.txt is a link to" in message


# ------------------------------------------------------------------------- 5: outputs never destroy inputs


@pytest.mark.parametrize("case", ["merge-onto-base", "merge-onto-adapter", "merge-into-parent", "merge-inside-base",
                                  "export-onto-src", "export-lora-onto-adapter", "train-onto-base", "gguf-inside"])
def test_an_output_may_not_be_contain_or_lie_inside_an_input(base, adapter, tmp_path, case):
    before = sorted(p.name for p in base.iterdir())
    argv = {
        "merge-onto-base": ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(base), "--overwrite"],
        "merge-onto-adapter": ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(adapter), "--overwrite"],
        "merge-into-parent": ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(base.parent), "--overwrite"],
        "merge-inside-base": ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(base / "merged")],
        "export-onto-src": ["export", str(base), str(base), "--format", "awq", "--overwrite"],
        "export-lora-onto-adapter": ["export-lora", str(adapter), str(adapter), "--base", str(base), "--overwrite"],
        "train-onto-base": ["train", str(base), str(base), "--steps", "1", "--overwrite"],
        "gguf-inside": ["export", str(base), str(base / "model.gguf"), "--format", "gguf"],
    }[case]
    message = cli_error(argv)
    assert "writing it would replace or delete that input" in message, message
    assert sorted(p.name for p in base.iterdir()) == before and adapter.is_dir()
    check_checkpoint(base)


def test_check_apart_resolves_links(tmp_path):
    (tmp_path / "model").mkdir()
    os.symlink(tmp_path / "model", tmp_path / "alias")
    with pytest.raises(ValueError, match="is the input"):
        check_apart(tmp_path / "alias", [tmp_path / "model"], "merge")
    check_apart(tmp_path / "model-merged", [tmp_path / "model"], "merge")  # a sibling with a common prefix is fine


# --------------------------------------------------------------------------- 6: no success with a broken model


@pytest.mark.parametrize("fmt", ["gptq", "gguf"])
@pytest.mark.parametrize("c", [1e8, -1.0])
def test_merge_refuses_scales_that_overflow_or_vanish(base, adapter, tmp_path, fmt, c, request):
    """Trained scales give s' = fp16(s (1 + c)): c = 1e8 overflows fp16, c = -1 zeroes the layer. (GGUF's block
    minimum m = -s' z overflows first where z > 0: refused too, by its own check.)"""
    if fmt == "gguf":  # the GGUF export needs a LLaMA with a real tokenizer; its linears have the tiny base's shapes
        base = request.getfixturevalue("llama_base")
    hostile = tmp_path / "hostile"
    shutil.copytree(adapter, hostile)
    ratio = json.loads((hostile / "adapter_config.json").read_text()).get("scale_lr_ratio", 1.0)
    tensors = load_file(hostile / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("qalora_scale"))
    tensors[key] = torch.full_like(tensors[key], c / ratio)  # the file holds c / scale_lr_ratio
    save_file(tensors, hostile / "adapter_model.safetensors")
    out = tmp_path / ("merged.gguf" if fmt == "gguf" else "merged")
    message = cli_error(["merge", "--base", str(base), "--adapter", str(hostile), "--out", str(out), "--format", fmt])
    assert ("merge: the trained scales of" in message and "beyond fp16, or zero" in message) or (
        fmt == "gguf" and "beyond fp16 (|m| <= 65504.0); Q4_1 cannot store this layer" in message), message
    assert not out.exists()


def test_train_refuses_to_publish_a_nan_adapter(base, tmp_path):
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = float("nan")
    (base / "config.json").write_text(json.dumps(config))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    message = cli_error(["train", str(base), str(tmp_path / "out"), "--text", str(text), "--steps", "1",
                         "--batch-size", "1", "--seq-len", "16", "--adapter"])
    assert "train: after training" in message and "NaN or Inf" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 7: one line, never a traceback


def _edit_header(path: Path, change) -> None:
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n:])


def _deep_config(folder: Path) -> None:
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _huge_int_config(folder: Path) -> None:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"bits": 4', '"bits": 4' + "0" * 5000))


def _number_in_index(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    ckpt.write_shard(folder / "model-00001-of-00001.safetensors", tensors)
    (folder / "model.safetensors").unlink()
    weight_map = {k: "model-00001-of-00001.safetensors" for k in tensors}
    weight_map[next(iter(weight_map))] = 7
    (folder / ckpt.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))


BROKEN_BASES = {
    "non-string metadata": (lambda f: _edit_header(f / "model.safetensors", lambda h: h.update(
        __metadata__={"format": 1})), "model.safetensors"),
    "shape product overflows": (lambda f: _edit_header(f / "model.safetensors", lambda h: next(
        v for k, v in h.items() if k != "__metadata__").update(shape=[2**40, 2**40, 2**40])), "model.safetensors"),
    "JSON nested 100,000 deep": (_deep_config, "config.json"),
    "an integer of 5,000 digits": (_huge_int_config, "config.json"),
    "an index value that is a number": (_number_in_index, ckpt.INDEX_NAME),
    "a tensor name with escape codes": (lambda f: _edit_header(f / "model.safetensors", lambda h: h.update(
        {"\x1b]0;pwned\x07evil.qweight": h.pop(next(k for k in h if k.endswith(".qweight")))})), "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_BASES))
def test_broken_bases_end_in_our_message(base, adapter, tmp_path, case):
    breaker, file = BROKEN_BASES[case]
    breaker(base)
    for argv in (["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")],
                 ["export", str(base), str(tmp_path / "e"), "--format", "awq"]):
        message = cli_error(argv)
        assert file in message and "\x1b" not in message and "\n" not in message, message
        assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_f8_adapter_tensors_end_in_our_message(base, adapter, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(adapter, hostile)
    tensors = load_file(hostile / "adapter_model.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, hostile / "adapter_model.safetensors")
    message = cli_error(["merge", "--base", str(base), "--adapter", str(hostile), "--out", str(tmp_path / "m")])
    assert message.startswith("error: adapters: ") and "adapter_model.safetensors stores" in message, message
    assert "as F8_E4M3, expected a 2-D float tensor" in message, message


@pytest.mark.parametrize("where", ["/proc/peft-qalora-out", "x" * 300, "read-only/out"])
def test_impossible_output_paths_end_in_our_message(base, adapter, tmp_path, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if where.startswith("read-only"):
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "read-only").mkdir(mode=0o555)
    message = cli_error(["merge", "--base", str(base), "--adapter", str(adapter), "--out", where])
    assert "cannot use" in message or "merge:" in message, message


def test_broken_tokenizer_json_names_the_file(base, tmp_path):
    (base / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    message = cli_error(["train", str(base), str(tmp_path / "out"), "--text", str(text), "--steps", "1"])
    assert "tokenizer.json" in message, message


def test_a_resume_checkpoint_that_is_not_a_pickle_ends_in_one_line(base, tmp_path):
    from peft_qalora.training.recipe import checkpoints_dir

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    step = checkpoints_dir(out) / "checkpoint-1"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    (step / "adapter_config.json").write_text("{}")
    for name in ("optimizer.pt", "rng_state.pth", "adapter_model.safetensors", "scheduler.pt"):
        (step / name).write_bytes(b"not a pickle at all")
    message = cli_error(["train", str(base), str(out), "--text", str(text), "--steps", "2", "--batch-size", "1",
                         "--seq-len", "16", "--resume", "--save-steps", "1"])
    assert "\n" not in message, message


def test_error_line_escapes_control_codes_and_names_the_file():
    assert shown("a\x1b[2Jb") == "a\\x1b[2Jb"
    err = PermissionError(13, "Permission denied", "/sys/out\x1b[31m")
    line = error_line(err)
    assert "/sys/out\\x1b[31m" in line and "Permission denied" in line and "\x1b" not in line


def test_cache_is_never_the_current_folder(tmp_path, monkeypatch):
    from peft_qalora.assets import cache_dir

    monkeypatch.delenv("PEFT_QALORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "home" / ".cache" / "peft-qalora"
    assert not (tmp_path / ".cache").exists()


# ------------------------------------------------------------------ 1, 4: the GGUF converter, isolated and fenced


PLANTED = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


def plant(folder: Path, marker: Path) -> None:
    """Modules the converter's child would import if the current folder or ./.cache were on its path."""
    code = PLANTED.format(marker=str(marker))
    for name in ("json.py", "gguf.py", "conversion.py", "numpy.py", "torch.py"):
        (folder / name).write_text(code)
    for package in ("peft_qalora", "gguf", "conversion"):
        (folder / ".cache" / package).mkdir(parents=True, exist_ok=True)
        (folder / ".cache" / package / "__init__.py").write_text(code)


@pytest.fixture
def llama_base(tmp_path):
    from helpers.models import build_llama_gptq

    return build_llama_gptq(tmp_path / "llama")


def test_gguf_export_runs_nothing_from_the_current_folder(llama_base, tmp_path):
    """The user's command run from inside a hostile folder: the export succeeds and no planted module runs."""
    hostile, marker = tmp_path / "downloaded", tmp_path / "MARKER"
    hostile.mkdir()
    plant(hostile, marker)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([CLI, "export", str(llama_base), str(tmp_path / "out.gguf"), "--format", "gguf"],
                          cwd=hostile, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists(), "a module planted in the current folder ran"
    assert (tmp_path / "out.gguf").is_file()


def test_gguf_converter_sees_only_the_checked_shards(llama_base, tmp_path):
    """A stray `model-*.safetensors` beside `model.safetensors` (no index) holding another output head: llama.cpp's
    converter takes every such file, so without staging it would replace the checked head."""
    from gguf import GGUFReader

    checked = load_file(llama_base / "model.safetensors")["lm_head.weight"]
    save_file({"lm_head.weight": torch.full_like(checked, 3.0)}, llama_base / "model-stray.safetensors")
    out = tmp_path / "out.gguf"
    main(["export", str(llama_base), str(out), "--format", "gguf"])
    head = next(t for t in GGUFReader(out).tensors if t.name == "output.weight")
    written = torch.from_numpy(head.data.astype("float32").reshape(checked.shape))
    torch.testing.assert_close(written, checked.float(), rtol=0, atol=0)


# -------------------------------------------------------------------------- 7: fuzz: our message or success


def _audited_opens():
    """Paths opened in this process while `_audited_opens.on` is set (audit hooks cannot be removed: gate them)."""
    if not hasattr(_audited_opens, "paths"):
        _audited_opens.paths, _audited_opens.on = [], False

        def hook(event, args):
            if _audited_opens.on and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                _audited_opens.paths.append(os.fsdecode(args[0]))
        sys.addaudithook(hook)
    return _audited_opens


def _json_values():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=8))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=6)


def test_fuzz_headers_and_configs_end_in_our_message_and_read_nothing_outside(tiny_gptq, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from peft_qalora.gptq.header import OWNER

    audit = _audited_opens()
    check_checkpoint(tiny_gptq)  # warm-up: imports done before the audit counts opens
    fields = st.sampled_from(["dtype", "shape", "data_offsets"])
    keys = st.sampled_from(["bits", "group_size", "desc_act", "sym", "checkpoint_format", "quant_method", "dynamic"])

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(field=fields, value=_json_values(), key=keys, quant_value=_json_values(), which=st.integers(0, 50))
    def run(field, value, key, quant_value, which):
        folder = tmp_path_factory.mktemp("fuzz")
        shutil.copytree(tiny_gptq, folder, dirs_exist_ok=True)
        if which % 2:
            _edit_header(folder / "model.safetensors", lambda h: h[sorted(k for k in h if k != "__metadata__")[
                which % (len(h) - 1)]].update({field: value}))
        else:
            config = json.loads((folder / "config.json").read_text())
            config["quantization_config"][key] = quant_value
            (folder / "config.json").write_text(json.dumps(config))
        audit.paths.clear()
        audit.on = True
        try:
            check_checkpoint(folder)
        except (ValueError, FileNotFoundError) as err:
            assert str(err).startswith(f"{OWNER}:"), err
        finally:
            audit.on = False
        root = str(folder.resolve())
        outside = [p for p in audit.paths if not os.path.realpath(p).startswith(root)]
        assert not outside, outside

    run()


def test_gguf_export_past_a_file_size_limit_ends_in_one_line(llama_base, tmp_path):
    """`ulimit -f`: the converter's write fails with EFBIG in the child; the user gets our line, no file."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "out.gguf"
    proc = subprocess.run([CLI, "export", str(llama_base), str(out), "--format", "gguf"], preexec_fn=limit,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: cannot use " in proc.stderr and "File too large (errno 27)" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))
