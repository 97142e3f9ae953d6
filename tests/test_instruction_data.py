"""Instruction data (peft_qalora.training.instruction): formats, loss masks worked out by hand, refusals, CLI and recipes.

The tokenizer is conftest's character-level one (one token per character, id = ord; "<1>" is EOS, id 1),
given a small chat template here, so every expected id list below can be read off the strings.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_tokenizer

from peft_qalora.cli import build_parser, load_recipe, main, train_settings
from peft_qalora import instruction_dataset, pad_collator
from peft_qalora.training.instruction import load_instruction_data

# user "U:..|", assistant "A:..<1>" then a space between turns; an unknown role raises from the template.
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}S:{{ m['content'] }}|"
    "{% elif m['role'] == 'user' %}U:{{ m['content'] }}|"
    "{% elif m['role'] == 'assistant' %}A:{{ m['content'] }}<1> "
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "no"}]


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def jsonl(path: Path, *rows) -> Path:
    """Write rows (objects as JSON, strings as they are) one a line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def ids_of(text: str) -> list[int]:
    """Ids of a string in the character tokenizer, reading "<1>" as EOS: the hand-made side of each check."""
    return [1 if part == "<1>" else ord(part) for part in re.findall(r"<1>|.", text)]


def masked(text: str, trained: str) -> list[int]:
    """Labels of `text` where `trained` marks the loss: '^' under a trained character, anything else not."""
    out, i = [], 0
    for part in re.findall(r"<1>|.", text):
        out.append(ids_of(part)[0] if trained[i] == "^" else -100)
        i += len(part)
    return out


# ---------------------------------------------------------------- masks by hand


def test_conversation_mask_by_hand(tmp_path):
    row = load_instruction_data(jsonl(tmp_path / "c.jsonl", {"messages": CHAT}), chat_tokenizer(), 64).dataset[0]
    text = "U:hi|A:yo<1> U:ok?|A:no<1> "
    #       assistant content + its end-of-turn EOS; not the header "A:", not the space after <1>
    marks = "       ^^^^^         ^^^^^ "
    assert row["input_ids"] == ids_of(text)
    assert row["labels"] == masked(text, marks)
    assert row["labels"] == [-100] * 7 + [121, 111, 1] + [-100] * 9 + [110, 111, 1, -100]  # the same, literally
    assert row["attention_mask"] == [1] * 23


def test_prompt_completion_mask_by_hand(tmp_path):
    f = jsonl(tmp_path / "p.jsonl", {"prompt": "Q:2+2=", "completion": "4"}, {"text": "ab"})
    rows = load_instruction_data(f, chat_tokenizer(), 64).dataset
    # no template for plain strings: prompt + completion + EOS, loss on the completion and EOS
    assert rows[0]["input_ids"] == [81, 58, 50, 43, 50, 61, 52, 1]
    assert rows[0]["labels"] == [-100] * 6 + [52, 1]
    assert rows[1]["input_ids"] == rows[1]["labels"] == [97, 98, 1]  # text: every token, EOS added


def test_train_on_prompt_trains_every_token(tmp_path):
    f = jsonl(tmp_path / "c.jsonl", {"messages": CHAT}, {"prompt": "Q:", "completion": "A"})
    rows = instruction_dataset(f, chat_tokenizer(), 64, train_on_prompt=True)
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_ids_are_the_templates_own(tmp_path):
    system = [{"role": "system", "content": "be brief"}, *CHAT]
    f = jsonl(tmp_path / "c.jsonl", {"messages": CHAT}, {"messages": system})
    tok = chat_tokenizer()
    rows = instruction_dataset(f, tok, 64)
    for row, messages in zip(rows, (CHAT, system)):
        assert row["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=False)


def test_truncation_counts_and_drops(tmp_path):
    long_prompt = {"prompt": "x" * 20, "completion": "y"}  # completion past seq_len: dropped
    long_text = {"text": "z" * 20}  # truncated, kept
    f = jsonl(tmp_path / "t.jsonl", long_prompt, long_text, {"prompt": "q", "completion": "a"})
    data = load_instruction_data(f, chat_tokenizer(), seq_len=8)
    assert (data.rows, data.truncated, data.dropped) == (2, 2, 1)
    assert [len(r) for r in data.dataset["input_ids"]] == [8, 3]
    with pytest.raises(ValueError, match=r"every row lost all its trained tokens to truncation at seq_len=8"):
        load_instruction_data(jsonl(tmp_path / "d.jsonl", long_prompt), chat_tokenizer(), seq_len=8)


def test_pad_collator_batches_ragged_rows(tmp_path):
    rows = instruction_dataset(jsonl(tmp_path / "p.jsonl", {"prompt": "Q:", "completion": "4"}, {"text": "a"}),
                               chat_tokenizer(), 64)
    batch = pad_collator(chat_tokenizer())([rows[0], rows[1]])
    assert batch["input_ids"].tolist() == [[81, 58, 52, 1], [97, 1, 2, 2]]  # pad id 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 52, 1], [97, 1, -100, -100]]


# ---------------------------------------------------------------- refusals, each with file:line


@pytest.mark.parametrize("line, match", [
    ('{"text": "ok"', r"not JSON \(Expecting ',' delimiter"),
    ('["a", "b"]', r"a JSON list, not an object"),
    ('{"input": "a", "output": "b"}', r"no known keys \(got \['input', 'output'\]\).*\{\"text\": \.\.\.\}, "
                                      r"\{\"prompt\": \.\.\., \"completion\": \.\.\.\}, \{\"messages\""),
    ('{"prompt": "a"}', r"has \['prompt'\] but no 'completion'; a prompt/completion row needs both"),
    ('{"prompt": "a", "completion": " "}', r"empty completion"),
    ('{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}', r"'prompt' is a list, not a string"),
    ('{"messages": [{"role": "user", "content": "a"}]}', r"no assistant turn \(roles \['user'\]\)"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     r"messages\[0\]\.content is list, not a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', r"messages\[1\]\.role 'bot' is not one the chat template knows"),
    ('{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     r"the chat template refused this conversation: unknown role tool"),
    ('{"messages": [{"role": "assistant", "content": "b"}]}', r"messages\[0\] is an assistant turn"),
])
def test_bad_rows_are_refused_with_file_and_line(tmp_path, line, match):
    f = jsonl(tmp_path / "bad.jsonl", {"text": "fine"}, "", line)
    with pytest.raises(ValueError, match=rf"^data: {re.escape(str(f))}:3: {match}"):
        instruction_dataset(f, chat_tokenizer(), 64)


def test_missing_empty_and_templateless_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data: .*nope.jsonl does not exist"):
        instruction_dataset(tmp_path / "nope.jsonl", chat_tokenizer(), 64)
    with pytest.raises(ValueError, match=r"data: .*empty.jsonl has no rows"):
        instruction_dataset(jsonl(tmp_path / "empty.jsonl", "", "  "), chat_tokenizer(), 64)
    f = jsonl(tmp_path / "c.jsonl", {"prompt": "a", "completion": "b"}, {"messages": CHAT})
    with pytest.raises(ValueError, match=rf"data: {re.escape(str(f))}:2: a messages row needs the tokenizer's chat "
                                         r"template.*chat_template.jinja.*or write prompt/completion rows"):
        instruction_dataset(f, tiny_tokenizer(), 64)  # the plain prompt/completion row needs none


# ---------------------------------------------------------------- CLI and recipes


def chat_base(tiny_gptq: Path, tmp_path: Path) -> Path:
    """The tiny GPTQ folder with a chat template in its tokenizer."""
    base = tmp_path / "base"
    shutil.copytree(tiny_gptq, base)
    chat_tokenizer().save_pretrained(base)
    return base


def test_cli_trains_on_jsonl_with_validation(tiny_gptq, tmp_path, capsys):
    base = chat_base(tiny_gptq, tmp_path)
    rows = [{"messages": CHAT}, {"prompt": "Q:2+2=", "completion": "4"}, {"text": "To be or not to be, " * 3}]
    train = jsonl(tmp_path / "train.jsonl", *rows)  # the text row (60 characters) is cut to 32
    valid = jsonl(tmp_path / "valid.jsonl", {"messages": CHAT}, {"prompt": "Q:1+1=", "completion": "2"})
    out = tmp_path / "adapter"
    main(["train", str(base), str(out), "--data", str(train), "--valid", str(valid), "--steps", "2",
          "--eval-steps", "1", "--batch-size", "2", "--seq-len", "32"])
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])  # the last thing printed
    assert "step 1: validation loss" in printed and "step 2: validation loss" in printed
    assert (summary["train_rows"], summary["truncated_rows"], summary["dropped_rows"]) == (3, 1, 0)
    assert summary["valid_rows"] == 2 and summary["best_step"] in (1, 2)
    assert summary["best_valid_loss"] <= summary["valid_loss"] and torch.isfinite(torch.tensor(summary["valid_loss"]))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_cli_refuses_bad_data_before_loading_the_model(tiny_gptq, tmp_path, monkeypatch):
    import peft_qalora.training.recipe as train_module

    monkeypatch.setattr(train_module, "load_gptq_model", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = jsonl(tmp_path / "bad.jsonl", {"text": "ok"}, {"messages": CHAT})  # the base's tokenizer has no template
    with pytest.raises(SystemExit, match=rf"error: data: {re.escape(str(bad))}:2: a messages row needs"):
        main(["train", str(tiny_gptq), str(tmp_path / "o"), "--data", str(bad), "--steps", "1"])
    with pytest.raises(SystemExit, match=r"error: train: give --data .* or --text, not both"):
        main(["train", str(tiny_gptq), str(tmp_path / "o"), "--data", str(bad), "--text", str(bad)])
    with pytest.raises(SystemExit, match=r"error: data: .*missing.jsonl does not exist"):
        main(["train", str(tiny_gptq), str(tmp_path / "o"), "--data", str(tmp_path / "missing.jsonl")])
    assert not (tmp_path / "o").exists()


def test_recipe_with_data_keys(tmp_path):
    from peft_qalora.cli import training_data

    train = jsonl(tmp_path / "train.jsonl", {"prompt": "Q:", "completion": "4"})
    valid = jsonl(tmp_path / "valid.jsonl", {"messages": CHAT})
    path = tmp_path / "r.yaml"
    path.write_text(f"base: b\nout_dir: o\nseq_len: 64\ndata: {train}\nvalid: {valid}\n"
                    "train_on_prompt: true\ntrain:\n  steps: 5\n  eval_steps: 2\n")
    recipe = load_recipe(str(path))
    args = build_parser().parse_args(["train", "--config", str(path)])
    settings = train_settings(args, recipe)
    assert (settings.steps, settings.eval_steps) == (5, 2)
    data, keywords, counts = training_data(args, recipe, chat_tokenizer(), recipe["seq_len"])
    assert data[0]["labels"] == data[0]["input_ids"] == [81, 58, 52, 1]  # train_on_prompt: true
    assert len(keywords["eval_dataset"]) == 1 and (counts["train_rows"], counts["valid_rows"]) == (1, 1)
    flags = build_parser().parse_args(["train", "--config", str(path), "--eval-steps", "3"])
    assert train_settings(flags, recipe).eval_steps == 3
    with pytest.raises(ValueError, match=r"TrainSettings: eval_steps=0"):
        train_settings(build_parser().parse_args(["train", "--eval-steps", "0"]), {})


# ---------------------------------------------------------------- TRL: a reference we did not write


def test_trl_masks_the_same_tokens_and_sft_trainer_takes_our_dataset(tiny_gptq, tmp_path):
    """TRL's own masking of the raw JSONL (assistant_only_loss through `{% generation %}`, completion-only loss for
    prompt/completion) trains the same tokens as ours; and SFTTrainer keeps our labels when handed our dataset."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from peft_qalora import QALoraConfig, load_gptq_model, prepare_model_for_training

    tok = chat_tokenizer()
    tok.chat_template = TEMPLATE.replace("A:{{ m['content'] }}<1> ",
                                         "A:{% generation %}{{ m['content'] }}<1>{% endgeneration %} ")
    rows = [{"messages": CHAT}, {"messages": [{"role": "system", "content": "be brief"}, *CHAT]}]
    files = {"chat": jsonl(tmp_path / "chat.jsonl", *rows),
             "plain": jsonl(tmp_path / "plain.jsonl", {"prompt": "Q:2+2=", "completion": "4"})}

    def sft(data, **options):
        args = SFTConfig(tmp_path / "sft", max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                         save_strategy="no", max_length=64, **options)
        model = prepare_model_for_training(load_gptq_model(tiny_gptq))
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                          peft_config=QALoraConfig(r=2))

    for name, f in files.items():
        raw = load_dataset("json", data_files=str(f), split="train", cache_dir=str(tmp_path / "hf"))
        theirs = sft(raw, assistant_only_loss=name == "chat").train_dataset
        ours = instruction_dataset(f, tok, 64)
        assert theirs["input_ids"] == ours["input_ids"] and theirs["labels"] == ours["labels"]
    trainer = sft(ours)
    trainer.train()
    assert trainer.train_dataset["labels"] == ours["labels"]


# ---------------------------------------------------------------- shipped sample data, a real template


SAMPLES = sorted((Path(__file__).parent.parent / "configs" / "data").glob("*.jsonl"))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_shipped_sample_data_loads(path):
    data = load_instruction_data(path, chat_tokenizer(), 256)
    assert data.rows == len(path.read_text().splitlines()) and data.dropped == 0


def test_chatml_spans_are_content_and_im_end():
    """SmolLM2-135M-Instruct's ChatML template (when cached): each trained span is the reply plus <|im_end|>,
    neither the `<|im_start|>assistant\\n` header nor the newline after <|im_end|>."""
    from transformers import AutoTokenizer

    from peft_qalora.assets import SMOLLM2_DIRNAME, cache_dir
    from peft_qalora.training.instruction import encode_row

    folder = cache_dir() / SMOLLM2_DIRNAME
    if not (folder / "chat_template.jinja").is_file():
        pytest.skip(f"no SmolLM2 tokenizer in {folder}")
    tok = AutoTokenizer.from_pretrained(folder)
    ids, labels = encode_row("x:1", {"messages": CHAT}, tok)
    trained = "".join(tok.decode([i]) if label != -100 else "\0" for i, label in zip(ids, labels))
    assert [s for s in trained.split("\0") if s] == ["yo<|im_end|>", "no<|im_end|>"]
