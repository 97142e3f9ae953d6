"""The demo's and the task benchmark's data (peft_qalora.tasks): splits, answers checked by an independent parser,
the chat JSONL that `train --data` reads, and greedy llama.cpp answers against full-sequence logits."""

from __future__ import annotations

import datetime as dt
import random
import re

import pytest
import torch

from peft_qalora.tasks import exact_match, make_items, render, shared_prefix, write_jsonl

PATTERNS = ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%d %b %Y", "%A, %B %d, %Y", "the %d of %B, %Y", "%B %d %Y")


def parse_date(text: str) -> dt.date:
    """The date in any of the seven human formats, by strptime (ordinal suffixes dropped first)."""
    plain = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", text)
    for pattern in PATTERNS:
        try:
            return dt.datetime.strptime(plain, pattern).date()
        except ValueError:
            continue
    raise AssertionError(f"no pattern parses {text!r}")


def test_dates_answers_are_the_iso_form_of_the_prompt():
    items = make_items("dates", n_train=300, n_test=50, n_val=20)
    for item in items["test"] + items["val"] + items["train"]:
        given = item["prompt"].split("\n", 1)[1]
        assert parse_date(given).isoformat() == item["answer"] == item["value"]
    shapes = {re.sub(r"\d+", "9", it["prompt"].split("\n", 1)[1]).split(" ")[0] for it in items["train"]}
    assert len(shapes) > 5  # several formats, not one


def test_held_out_values_are_never_trained_on_and_items_are_reproducible():
    items = make_items("dates", n_train=4000, n_test=100, n_val=64)
    held = {it["value"] for it in items["test"]} | {it["value"] for it in items["val"]}
    assert len(items["test"]) == 100 and len(items["val"]) == 64 and len(held) == 164
    assert not held & {it["value"] for it in items["train"]}
    assert make_items("dates", 40, 10, 5) == make_items("dates", 40, 10, 5)
    assert make_items("dates", 40, 10, 5, seed=1) != make_items("dates", 40, 10, 5)


def test_numbers_in_words_worked_by_hand():
    pytest.importorskip("num2words")
    assert render("numbers", 1234, random.Random(0)) == ("1234", "one thousand, two hundred and thirty-four")
    assert render("numbers", 40, random.Random(0)) == ("40", "forty")


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'sums': choose one of dates, numbers"):
        make_items("sums", 1, 1, 1)


def test_shared_prefix_and_exact_match_by_hand():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # at least one token left to evaluate per prompt
    items = [{"answer": "a"}, {"answer": "b"}, {"answer": "c"}, {"answer": "d"}]
    assert exact_match(items, ["a", "b ", "x", "d"]) == 0.5


def test_jsonl_trains_on_the_answer_and_its_end_token_only(tmp_path):
    from transformers import AutoTokenizer

    from peft_qalora.assets import smollm2_dir
    from peft_qalora.training.instruction import load_instruction_data

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    items = make_items("dates", 6, 1, 1)["train"]
    data = load_instruction_data(write_jsonl(items, tmp_path / "train.jsonl"), tok, 128)
    assert data.rows == 6
    for item, row in zip(items, data.dataset):
        trained = [t for t in row["labels"] if t != -100]
        assert tok.decode(trained) == item["answer"] + "<|im_end|>"
        expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"{item['prompt']}<|im_end|>\n<|im_start|>assistant\n{item['answer']}<|im_end|>\n")
        assert tok.decode(row["input_ids"]) == expected


def test_greedy_llamacpp_is_the_argmax_chain_of_full_sequence_logits(tmp_path):
    """Incremental decoding with the shared prefix evaluated once gives, at every step, the argmax of the logits
    llama.cpp computes for the whole sequence from scratch."""
    pytest.importorskip("llama_cpp")
    from helpers.models import build_llama_gptq, llama_cpp_logits

    from peft_qalora.exports.gguf import export_gguf
    from peft_qalora.tasks import greedy_llamacpp

    folder = build_llama_gptq(tmp_path / "gptq")
    path = tmp_path / "m.gguf"
    export_gguf(folder, path, progress=False)
    prompts = [[1, 5, 9, 12, 40], [1, 5, 9, 30], [1, 5, 7, 7, 7, 2]]
    outs = greedy_llamacpp(path, prompts, stop=set(), max_new=6)
    for prompt, out in zip(prompts, outs):
        assert out, "the tiny model has no reason to stop at once"
        ids = torch.tensor([prompt + out])
        logits = llama_cpp_logits(path, ids)[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out
