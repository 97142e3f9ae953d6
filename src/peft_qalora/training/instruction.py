"""Instruction data: JSONL rows of text, prompt/completion or messages -> token ids and loss labels.

The three row formats are the ones TRL's SFTTrainer and mlx_lm.lora read (docs/training-data.md):

- ``{"text": ...}``: tokenized as is (the tokenizer's own special tokens) plus EOS; loss on every token.
- ``{"prompt": ..., "completion": ...}`` (strings): concatenated with NO chat template, as TRL does for
  non-conversational rows, plus EOS; loss on the completion and the EOS. The completion starts where the
  tokens of ``prompt`` and of ``prompt + completion`` first differ (TRL's rule: a merge across the boundary
  counts as completion).
- ``{"messages": [{"role", "content"}, ...]}``: rendered by the tokenizer's own chat template
  (``apply_chat_template``, the ids it returns, no EOS added); loss on each assistant turn's content and the
  end-of-turn tokens the template writes after it, nothing else.

Assistant spans are found by rendering prefixes of the conversation and diffing token ids, which works with
any template (``{% generation %}`` markers, which ``return_assistant_tokens_mask`` needs, are rare): a turn
starts where ``messages[:i]`` with the generation prompt ends, and ends where ``messages[:i + 1]`` ends, less
trailing tokens that decode to whitespace only (the separator between turns, e.g. ChatML's newline after
``<|im_end|>``), so the span is the content plus the end-of-turn marker.

``train_on_prompt`` puts every token in the loss. Rows longer than ``seq_len`` are truncated at the end (not
packed, not split) and counted; a row left with no trained token is dropped and counted. Every refusal
names ``file:line`` and happens while reading, so before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
"""Label of a token outside the loss (transformers' and TRL's convention)."""
ROLES = ("system", "user", "assistant", "tool")
"""Roles accepted without looking in the template; any other must be named in the template's source."""
FORMATS = ('{"text": ...}', '{"prompt": ..., "completion": ...}',
           '{"messages": [{"role": ..., "content": ...}, ...]}')


@dataclass
class InstructionData:
    """A tokenized JSONL file: the dataset for Trainer and what happened to its rows."""

    dataset: Any
    """A ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the loss)."""
    rows: int
    """Rows kept."""
    truncated: int
    """Rows longer than ``seq_len``, cut to it (kept unless nothing trained was left: see ``dropped``)."""
    dropped: int
    """Rows whose trained tokens all lay past ``seq_len``: no loss left, so left out."""
    trained_tokens: int
    """Tokens with a label, over the kept rows."""


def instruction_dataset(path: str | Path, tokenizer: Any, seq_len: int, train_on_prompt: bool = False) -> Any:
    """A ``datasets.Dataset`` (input_ids, attention_mask, labels) from a JSONL file, for ``Trainer``.

    Rows have different lengths: batch them with :func:`pad_collator` (``Trainer(data_collator=...)``), or
    hand the dataset to TRL's ``SFTTrainer``, which pads it and keeps its labels.

    Args:
        path: a JSONL file of ``text``, ``prompt``/``completion`` or ``messages`` rows (module docstring).
        tokenizer: a transformers tokenizer; ``messages`` rows need its ``chat_template``.
        seq_len: longest sequence; longer rows are truncated at the end.
        train_on_prompt: loss on every token, prompts and user turns included.
    """
    return load_instruction_data(path, tokenizer, seq_len, train_on_prompt).dataset


def load_instruction_data(path: str | Path, tokenizer: Any, seq_len: int,
                          train_on_prompt: bool = False) -> InstructionData:
    """:func:`instruction_dataset` with the counts of truncated and dropped rows."""
    from datasets import Dataset

    if seq_len < 1:
        raise ValueError(f"data: seq_len={seq_len}; use a positive number of tokens.")
    ids, labels, truncated, dropped = [], [], 0, 0
    for where, row in read_rows(path):
        row_ids, row_labels = encode_row(where, row, tokenizer, train_on_prompt)
        truncated += len(row_ids) > seq_len
        row_ids, row_labels = row_ids[:seq_len], row_labels[:seq_len]
        if all(label == IGNORE for label in row_labels):
            dropped += 1
            continue
        ids.append(row_ids)
        labels.append(row_labels)
    if not ids:
        raise ValueError(f"data: {path}: every row lost all its trained tokens to truncation at seq_len={seq_len}; "
                         "raise --seq-len (seq_len: in a recipe) or shorten the prompts.")
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": labels})
    trained = sum(label != IGNORE for row in labels for label in row)
    return InstructionData(dataset, len(ids), truncated, dropped, trained)


# ------------------------------------------------------------------ reading and checking rows


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """``[("file:line", row), ...]`` for the non-blank lines of a JSONL file, each checked by :func:`row_format`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} does not exist (or is not a file); give a JSONL file of "
                                f"{' / '.join(FORMATS)} rows.")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                where = f"{path}:{number}"
                rows.append((where, _parse(where, line)))
    if not rows:
        raise ValueError(f"data: {path} has no rows (it is empty or blank); write one JSON object a line: "
                         f"{' / '.join(FORMATS)}.")
    return rows


def _parse(where: str, line: str) -> dict:
    """One line as a JSON object whose format :func:`row_format` recognises."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"data: {where}: not JSON ({err.msg} at column {err.colno}): {line.strip()[:60]!r}; "
                         "each line must be one JSON object.") from None
    if not isinstance(row, dict):
        raise ValueError(f"data: {where}: a JSON {type(row).__name__}, not an object: {line.strip()[:60]!r}; "
                         f"each line must be one object: {' / '.join(FORMATS)}.")
    row_format(where, row)
    return row


def row_format(where: str, row: dict) -> str:
    """'messages', 'prompt' or 'text': which format ``row`` is, after checking its fields (no tokenizer needed)."""
    if "messages" in row:
        _check_messages(where, row["messages"])
        return "messages"
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            _check_string(where, row, key, 'for a conversation write {"messages": [...]}')
        if not row["completion"].strip():
            raise ValueError(f"data: {where}: empty completion: nothing to train on; fill it in or drop the row.")
        return "prompt"
    if "text" in row:
        _check_string(where, row, "text", "write the text as one string")
        if not row["text"].strip():
            raise ValueError(f"data: {where}: empty text: nothing to train on; fill it in or drop the row.")
        return "text"
    raise ValueError(f"data: {where}: no known keys (got {sorted(row)}); a row is one of the three formats "
                     f"{', '.join(FORMATS)}.")


def _check_string(where: str, row: dict, key: str, fix: str) -> None:
    if key not in row:
        raise ValueError(f"data: {where}: has {sorted(row)} but no {key!r}; a prompt/completion row needs both.")
    if not isinstance(row[key], str):
        raise ValueError(f"data: {where}: {key!r} is a {type(row[key]).__name__}, not a string; {fix}.")


def _check_messages(where: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"data: {where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, "
                         f"got {json.dumps(messages)[:60]}.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"data: {where}: messages[{i}] must be an object with a string 'role', "
                             f"got {json.dumps(message)[:60]}.")
        if not isinstance(message.get("content"), str):
            kind = type(message.get("content")).__name__ if "content" in message else "missing"
            raise ValueError(f"data: {where}: messages[{i}].content is {kind}, not a string; only text content is "
                             "read (no images or content-part lists).")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError(f"data: {where}: no assistant turn (roles {roles}); loss is on assistant turns, so add one "
                         "or drop the row.")
    if roles[0] == "assistant":
        raise ValueError(f"data: {where}: messages[0] is an assistant turn; start the conversation with a system "
                         "or user turn.")


# ------------------------------------------------------------------ token ids and labels


def encode_row(where: str, row: dict, tokenizer: Any, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one checked row; labels are -100 outside the loss."""
    kind = row_format(where, row)
    if kind == "text":
        ids = _with_eos(tokenizer, _encode(tokenizer, row["text"]))
        return ids, list(ids)
    if kind == "prompt":
        ids = _with_eos(tokenizer, _encode(tokenizer, row["prompt"] + row["completion"]))
        start = _common_prefix(_encode(tokenizer, row["prompt"]), ids)
        spans = [(start, len(ids))]
    else:
        ids, spans = _chat(where, row["messages"], tokenizer)
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids with the tokenizer's own special tokens (a BOS where it adds one), as TRL tokenizes text."""
    return list(tokenizer(text)["input_ids"])


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` ending in EOS, so the model learns to stop (TRL and mlx_lm add it too)."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _chat(where: str, messages: list[dict], tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """The template's ids for the conversation and the ``[start, end)`` token span of each assistant turn."""
    template = _template_source(where, tokenizer)
    for i, message in enumerate(messages):
        if message["role"] not in ROLES and message["role"] not in template:
            raise ValueError(f"data: {where}: messages[{i}].role {message['role']!r} is not one the chat template "
                             f"knows; use one of {list(ROLES)}.")
    ids = _render(where, tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = _common_prefix(_render(where, tokenizer, messages[:i], add_generation_prompt=True), ids)
            end = _common_prefix(_render(where, tokenizer, messages[: i + 1]), ids)
            while end > start and not tokenizer.decode(ids[end - 1:end]).strip():
                end -= 1  # the separator after the end-of-turn marker belongs to no turn
            spans.append((start, end))
    if all(end <= start for start, end in spans):
        raise ValueError(f"data: {where}: the chat template renders no assistant tokens for this conversation; "
                         "check the template, or write the row as prompt/completion.")
    return ids, spans


def _template_source(where: str, tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"data: {where}: a messages row needs the tokenizer's chat template, and this tokenizer "
                         "has none; add one (e.g. the instruct model's chat_template.jinja beside the base's "
                         "tokenizer files, or tokenizer.chat_template = ...), or write prompt/completion rows.")
    return template if isinstance(template, str) else json.dumps(template)


def _render(where: str, tokenizer: Any, messages: list[dict], **kwargs: Any) -> list[int]:
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except TemplateError as err:
        raise ValueError(f"data: {where}: the chat template refused this conversation: {err}") from None
    return list(out["input_ids"])


# ------------------------------------------------------------------ batching


@dataclass
class PadCollator:
    """Pads rows of different lengths on the right: ``pad_id`` in input_ids, 0 in the mask, -100 in labels."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", IGNORE)}


def pad_collator(tokenizer: Any) -> PadCollator:
    """A :class:`PadCollator` with the tokenizer's pad token (else EOS, else 0: masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PadCollator(pad if pad is not None else 0)
