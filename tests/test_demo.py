"""`make demo` on SmolLM2 cut to 2 layers: the whole path runs and writes what it says; its before / after table
and exact match are the answers of the two GGUF files (greedy decoding itself: test_tasks.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_demo_trains_merges_exports_and_answers_before_and_after(tmp_path):
    pytest.importorskip("llama_cpp")
    from helpers.serving_compare import build_smollm2_cut
    from transformers import AutoTokenizer

    from peft_qalora.demo import DemoSettings, run_demo
    from peft_qalora.tasks import answers_llamacpp

    lines = []
    settings = DemoSettings(steps=2, batch_size=2, n_test=3, n_valid=2, shown=2)
    out = run_demo(settings, lines.append, model_dir=build_smollm2_cut(tmp_path / "cut"), work=tmp_path / "work")
    text = "\n".join(lines)
    work = tmp_path / "work"
    assert (work / "adapter" / "adapter_config.json").is_file() and (work / "merged" / "config.json").is_file()
    assert sum(1 for _ in open(work / "data" / "train.jsonl")) == 4  # steps x batch chats
    assert "| input | expected | before (base) | after (fine-tuned) |" in text
    for item in out["items"][:2]:
        assert f"| {item['prompt'].split(chr(10))[1]} | {item['answer']} |" in text
    assert "best validation loss" in text and "serve it:  llama-server -m" in text
    tok = AutoTokenizer.from_pretrained(work / "gptq-4b-g32")
    for name, path in out["files"].items():
        assert out["answers"][name] == answers_llamacpp(path, tok, out["items"])
        hits = sum(a == it["answer"] for a, it in zip(out["answers"][name], out["items"]))
        assert out["exact_match"][name] == hits / 3
    assert (f"before {100 * out['exact_match']['base']:.0f}%, after {100 * out['exact_match']['fine-tuned']:.0f}%"
            in text)


def test_demo_refuses_a_nonpositive_size():
    from peft_qalora.demo import DemoSettings

    with pytest.raises(ValueError, match="demo: steps=0; use a positive number"):
        DemoSettings(steps=0)
    with pytest.raises(ValueError, match="demo: task='sums'; choose one of dates, numbers"):
        DemoSettings(task="sums")
