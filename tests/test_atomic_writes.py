"""Every writer, attacked: SIGKILL at named points, two writers racing for one destination, a full disk.

Whatever happens, the destination is absent, the old one (byte for byte), or a complete new one that
loads. Writers run in forked children (`killable.py`); the full disk is a real tmpfs of a chosen size
in a private mount namespace where the kernel allows one, and a patched write everywhere.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors import SafetensorError

from helpers.tiny import TINY, tiny_tokenizer
from helpers.killable import Child, private_tmpfs, tmpfs_available
from peft_qalora import QALoraConfig, load_gptq_model
from peft_qalora.merge.adapters import read_adapter
from peft_qalora.utils.atomic import DiskFullError, atomic_output_file, pause_point
from peft_qalora.gptq import checkpoint as ckpt
from peft_qalora.gptq.header import read_header
from peft_qalora.gptq.validate import check_checkpoint

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
OLD = "OLD_OUTPUT"  # a file added to the old destination, to tell it from the new one


# ----------------------------------------------------------------- the writers, as a child runs them


def _quantize(i, dest, overwrite):
    from peft_qalora.base.quantize import QuantizeSettings, quantize_model

    settings = QuantizeSettings(bits=4, calibration_windows=2, seq_len=32, batch_size=2)
    quantize_model(i["float"], dest, settings, [TEXT], overwrite=overwrite)


def _save_quantized(i, dest, overwrite, format="gptq"):
    from peft_qalora.base.save import save_quantized

    save_quantized(load_gptq_model(i["base"]), dest, overwrite=overwrite, max_shard_bytes=40_000, format=format)


def _merge(i, dest, overwrite):
    from peft_qalora.merge.files import merge_checkpoint

    merge_checkpoint(i["base"], i["adapter"], dest, overwrite=overwrite, progress=False)


def _export(i, dest, overwrite):
    from peft_qalora.exports import export

    export(i["base"], dest, "compressed-tensors", overwrite=overwrite, progress=False)


def _merge_export(i, dest, overwrite):
    from peft_qalora.exports import merge_and_export

    merge_and_export(i["base"], i["adapter"], dest, "awq", overwrite=overwrite, progress=False)


def _export_lora(i, dest, overwrite):
    from peft_qalora.exports.lora import export_lora

    export_lora(i["adapter"], dest, i["base"], overwrite=overwrite)


def _train(i, dest, overwrite):
    from peft_qalora.training.recipe import TrainSettings, train_adapter

    windows = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    train_adapter(i["base"], windows, dest, TrainSettings(steps=1, batch_size=2, r=2), overwrite=overwrite)


WRITERS = {  # name: (function, what it writes)
    "quantize": (_quantize, "gptq"),
    "save_quantized": (_save_quantized, "gptq"),
    "save_quantized awq": (lambda i, d, o: _save_quantized(i, d, o, "awq"), "export"),
    "merge": (_merge, "gptq"),
    "export": (_export, "export"),
    "merge --format awq": (_merge_export, "export"),
    "export-lora": (_export_lora, "lora"),
    "train": (_train, "adapter"),
}
# where each writer is killed: (with a free destination, when overwriting a good one)
EVERY = (("opened", "shard", "written"), ("shard", "written", "exchanged"))
POINTS = {name: EVERY for name in WRITERS}
POINTS["quantize"] = (("shard", "written"), ("shard", "exchanged"))  # GPTQModel runs first: 2 s a kill
POINTS["train"] = (("step-1", "written"), ("written", "exchanged"))  # 2 s a kill; peft's save has no shard point
KILLS = [(w, p, False) for w in WRITERS for p in POINTS[w][0]] + [(w, p, True) for w in WRITERS for p in POINTS[w][1]]
KILL_IDS = [f"{w}-{p}{'-overwrite' if o else ''}" for w, p, o in KILLS]


def write(name, inputs, dest, overwrite, no_renameat2=False):
    """In a child: run writer `name` (without renameat2: the locked fallback)."""
    if no_renameat2:
        import peft_qalora.utils.atomic

        peft_qalora.utils.atomic._renameat2 = None
    WRITERS[name][0](inputs, Path(dest), overwrite)


# ----------------------------------------------------------------- inputs and checks


@pytest.fixture(scope="module")
def inputs(tiny_gptq_factory, tmp_path_factory) -> dict:
    """A 3-shard GPTQ base, two different adapters (unconstrained: export-lora takes them), a float model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_qalora.base.save import write_sharded

    root = tmp_path_factory.mktemp("inputs")
    base = root / "base"
    base.mkdir()
    tiny_gptq = tiny_gptq_factory(4)
    write_sharded(base, ckpt.read_tensors(tiny_gptq / "model.safetensors"), max_shard_bytes=40_000)
    ckpt.copy_side_files(tiny_gptq, base)
    ckpt.write_configs(base, ckpt.read_config(tiny_gptq), ckpt.read_quant_config(tiny_gptq))
    assert len(check_checkpoint(base).shards) >= 3
    paths = {"base": str(base), "float": str(root / "float")}
    for name, seed in (("adapter", 0), ("adapter_b", 1)):
        torch.manual_seed(seed)
        config = QALoraConfig(r=2, init_lora_weights=False, merge_strategy="nearest")
        get_peft_model(load_gptq_model(base), config).save_pretrained(root / name)
        paths[name] = str(root / name)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(root / "float")
    tiny_tokenizer().save_pretrained(root / "float")
    return paths


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """`reference(name, adapter)`: the folder an uninterrupted run of writer `name` writes (made once)."""
    root, made = tmp_path_factory.mktemp("reference"), {}

    def get(name: str, adapter: str = "adapter") -> Path:
        if (name, adapter) not in made:
            made[name, adapter] = root / f"{name}-{adapter}".replace(" ", "_")
            WRITERS[name][0](dict(inputs, adapter=inputs[adapter]), made[name, adapter], False)
        return made[name, adapter]

    return get


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_complete(kind: str, folder: Path) -> None:
    """`folder` is a whole output: a GPTQ checkpoint that loads and runs, an export whose config and every
    shard (headers checked) are there, or an adapter our validating reader takes."""
    if kind == "adapter":
        read_adapter(folder)
        return
    if kind == "lora":
        config = json.loads((folder / "adapter_config.json").read_text())
        keys = list(read_header(folder / "adapter_model.safetensors", "written by the test"))
        assert config["peft_type"] == "LORA" and len(keys) == 2 * 14 and len([k for k in keys if "lora_A" in k]) == 14
        return
    if kind == "gptq":
        check_checkpoint(folder)
        logits = load_gptq_model(folder)(torch.randint(3, 128, (1, 8))).logits
        assert torch.isfinite(logits).all()
        return
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] in ("awq", "compressed-tensors")
    index = folder / ckpt.INDEX_NAME
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    shards = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    stored = {}
    for shard in shards:
        stored.update({k: shard for k in read_header(folder / shard, "written by the test")})
    assert weight_map is None or stored == weight_map
    assert any(k.endswith(".qweight") or k.endswith(".weight_packed") for k in stored)


def strays(dest: Path) -> list[Path]:
    """What sits beside `dest` (every test gives `dest` a folder of its own)."""
    return sorted(p for p in dest.parent.iterdir() if p.name != dest.name)


# ----------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("name,point,overwrite", KILLS, ids=KILL_IDS)
def test_killed_writer_leaves_nothing_or_the_old_or_the_whole_new(inputs, reference, tmp_path, name, point, overwrite):
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    if overwrite:
        shutil.copytree(reference(name), dest)
        (dest / OLD).write_text("the old output")
    before = snapshot(dest) if overwrite else None
    child = Child(write, (name, inputs, str(dest), overwrite), tmp_path / "paused", pause_at=point)
    child.wait_paused()
    child.kill()
    partial = strays(dest)
    assert all(p.name.startswith(".model.partial-") for p in partial), partial  # hidden, beside, never inside
    if point == "exchanged":  # the new folder is in, the old one not yet removed
        assert not (dest / OLD).exists() and [(p / OLD).is_file() for p in partial] == [True]
        check_complete(WRITERS[name][1], dest)
    elif overwrite:
        assert snapshot(dest) == before
    else:
        assert not dest.exists()
    if point in ("shard", "written"):  # the writer had written into its temporary folder
        assert any(f.is_file() and f.name != OLD for p in partial for f in p.rglob("*"))


# ----------------------------------------------------------------- races


@pytest.mark.parametrize("overwrite", [False, True], ids=["neither-overwrites", "both-overwrite"])
@pytest.mark.parametrize("no_renameat2", [False, True], ids=["renameat2", "locked-fallback"])
def test_two_merges_racing_end_with_one_whole_result(inputs, reference, tmp_path, overwrite, no_renameat2):
    """Two merges of different adapters into one destination, both stopped with everything written and
    let go together: the destination is one run's whole output, never a mix; without --overwrite the
    other run says so; no temporary folder (nor, overwriting, the old output) is left beside it."""
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    if overwrite:
        shutil.copytree(reference("merge"), dest)
        (dest / OLD).write_text("the old output")
    adapters = ("adapter", "adapter_b")
    children = [Child(write, ("merge", dict(inputs, adapter=inputs[a]), str(dest), overwrite, no_renameat2),
                      tmp_path / f"paused-{a}", pause_at="written") for a in adapters]
    for child in children:
        child.wait_paused()
    for child in children:
        child.release()
    outcomes = [child.join() for child in children]
    if overwrite:
        assert [o["ok"] for o in outcomes] == [True, True], outcomes
    else:
        assert sorted(o["ok"] for o in outcomes) == [False, True], outcomes
        lost = next(o for o in outcomes if not o["ok"])
        assert lost["type"] == "FileExistsError" and "appeared while this run was writing it" in lost["error"]
    assert strays(dest) == []
    candidates = [_without_timing(snapshot(reference("merge", a))) for a in adapters]
    assert candidates[0] != candidates[1] and _without_timing(snapshot(dest)) in candidates
    if not overwrite:  # the one that succeeded is the one whose output is there
        assert _without_timing(snapshot(dest)) == candidates[[o["ok"] for o in outcomes].index(True)]


def _without_timing(files: dict[str, bytes]) -> dict:
    report = json.loads(files.pop("merge_report.json"))
    report.pop("seconds")
    return dict(files, report=report)


# ----------------------------------------------------------------- a full disk


def fill_disk(name, inputs, disks):
    """In a child: run writer `name` onto each disk `(mount point, size, old)`, a tmpfs of `size` bytes whose
    destination first holds a copy of `old` (a good output, or None). Returns per disk the error and whether
    the disk is as it was before the run."""
    private_tmpfs([Path(d[0]) for d in disks], [d[1] for d in disks])
    results = []
    for mount, _, old in disks:
        dest = Path(mount) / "model"
        if old:
            shutil.copytree(old, dest)
        before = snapshot(Path(mount))
        try:
            WRITERS[name][0](inputs, dest, bool(old))
            results.append({"ok": True})
        except Exception as err:  # noqa: BLE001 (reported to the test)
            results.append({"ok": False, "type": type(err).__name__, "error": str(err), "dest": str(dest),
                            "unchanged": snapshot(Path(mount)) == before})
    return results


def folder_bytes(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


# fractions of the output's size (less a page) where the disk fills: at different writes of each writer
FILLS = {name: (0.0, 0.35, 0.7, 1.0) for name in WRITERS}
FILLS.update({name: (0.35, 1.0) for name in ("quantize", "train", "save_quantized", "save_quantized awq")})  # slow


@pytest.mark.parametrize("name", list(WRITERS))
def test_full_disk_leaves_the_destination_as_it_was_and_says_so(inputs, reference, tmp_path, name):
    if not tmpfs_available(tmp_path):
        pytest.skip("no unprivileged user and mount namespaces here (the patched-write test below still runs)")
    ref = reference(name)
    need = folder_bytes(ref)
    cases = [(f, None) for f in FILLS[name]] + [(0.5, ref)]  # the last overwrites a good output
    disks = []
    for k, (fraction, old) in enumerate(cases):
        (tmp_path / f"disk-{k}").mkdir()
        size = max(4096, int(fraction * need) - 4096 + (need + 8192 if old else 0))
        disks.append((str(tmp_path / f"disk-{k}"), size, str(old) if old else None))
    outcome = Child(fill_disk, (name, inputs, disks), tmp_path / "marker").join()
    assert outcome["ok"], outcome.get("trace")
    outcomes = outcome["value"]
    for o in outcomes:
        assert not o["ok"] and o["type"] == "DiskFullError", o
        assert "no space left on device while writing " in o["error"] and o["unchanged"], o
        assert f"nothing was written to {o['dest']}" in o["error"], o
    assert "it still holds what was there before" in outcomes[-1]["error"]
    files = sorted({o["error"].split("while writing ")[1].split(";")[0] for o in outcomes})
    print(f"ENOSPC {name}: {len(outcomes)} fills, failing at {files}")


PATCHED = {  # writer: (what fails, on which call); "pwrite": the exports' streamed shards (gptq/streaming.py)
    "merge": ("copyfile", 2), "export": ("pwrite", 2), "merge --format awq": ("pwrite", 3),
    "export-lora": ("serialize", 1), "save_quantized": ("serialize", 2), "save_quantized awq": ("pwrite", 5),
}


@pytest.mark.parametrize("name", list(PATCHED))
def test_full_disk_patched_write(inputs, reference, tmp_path, monkeypatch, name):
    """The same without a tmpfs: the n-th shard write or copy fails as a full disk does."""
    import safetensors.torch

    from peft_qalora.gptq import streaming

    what, nth = PATCHED[name]
    calls = []
    module, attr = {"copyfile": (shutil, "copyfile"), "pwrite": (streaming, "_pwrite_all")}.get(
        what, (safetensors.torch, "serialize_file"))
    real = getattr(module, attr)

    def full(*args, **kw):
        calls.append(1)
        if len(calls) == nth:
            if what == "copyfile":
                raise OSError(28, "No space left on device", str(args[0]), None, str(args[1]))
            if what == "pwrite":
                raise OSError(28, "No space left on device")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kw)

    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    shutil.copytree(reference(name), dest)
    before = snapshot(dest)
    monkeypatch.setattr(module, attr, full)
    with pytest.raises(DiskFullError, match=rf"{name.split()[0]}.*: no space left on device while writing [^;]+; "
                                            rf"nothing was written to {re.escape(str(dest))} \(it still holds"):
        WRITERS[name][0](inputs, dest, True)
    assert snapshot(dest) == before and strays(dest) == []


def test_full_disk_on_the_command_line(inputs, tmp_path, monkeypatch):
    from peft_qalora.cli import main

    real = shutil.copyfile
    def full(src, dst):  # the second shard's copy fills the disk, as shutil reports it
        if "00002" in str(src):
            raise OSError(28, "No space left on device", str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(SystemExit, match=r"^error: merge: no space left on device while writing "
                                         r"model-00002-of-00003.safetensors; nothing was written to "):
        main(["merge", "--base", inputs["base"], "--adapter", inputs["adapter"], "--out", str(tmp_path / "m")])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- one file


def _write_file(dest, overwrite, data):
    with atomic_output_file(dest, overwrite, "write-file") as tmp:
        tmp.write_bytes(data[: len(data) // 2])
        pause_point("half")
        with open(tmp, "ab") as f:
            f.write(data[len(data) // 2:])


@pytest.mark.parametrize("point", ["opened", "half", "written"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_atomic_output_file_killed(tmp_path, point, overwrite):
    dest = tmp_path / "out" / "model.bin"
    dest.parent.mkdir()
    if overwrite:
        dest.write_bytes(b"old")
    child = Child(_write_file, (str(dest), overwrite, b"new" * 1000), tmp_path / "paused", pause_at=point)
    child.wait_paused()
    child.kill()
    assert (dest.read_bytes() == b"old") if overwrite else not dest.exists()
    assert all(p.name.startswith(".model.bin.partial-") for p in strays(dest))


@pytest.mark.parametrize("overwrite", [False, True])
def test_atomic_output_file_race_and_full_disk(tmp_path, monkeypatch, overwrite):
    dest = tmp_path / "out" / "model.bin"
    dest.parent.mkdir()
    children = [Child(_write_file, (str(dest), overwrite, bytes([65 + k]) * 5000), tmp_path / f"p{k}",
                      pause_at="written") for k in range(2)]
    for child in children:
        child.wait_paused()
    for child in children:
        child.release()
    ok = [child.join()["ok"] for child in children]
    assert sorted(ok) == ([True, True] if overwrite else [False, True])
    assert dest.read_bytes() in (b"A" * 5000, b"B" * 5000) and strays(dest) == []

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=rf"write-file: no space left on device while writing model.bin; "
                                            rf"nothing was written to {re.escape(str(dest))} \(it still holds"):
        _write_file(dest, True, b"C" * 10)
    monkeypatch.undo()
    assert dest.read_bytes() in (b"A" * 5000, b"B" * 5000) and strays(dest) == []


def test_atomic_cache_dir_keeps_the_entry_another_process_published_first(tmp_path):
    from peft_qalora.utils.atomic import atomic_cache_dir

    dest = tmp_path / "entry"
    with atomic_cache_dir(dest) as tmp:
        (tmp / "ours").write_text("ours")
        dest.mkdir()  # another process wins the race while we build
        (dest / "theirs").write_text("theirs")
    assert [p.name for p in dest.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # our temporary folder is gone
    with pytest.raises(ValueError, match="boom"), atomic_cache_dir(tmp_path / "other") as tmp:
        raise ValueError("boom")
    assert not (tmp_path / "other").exists()
