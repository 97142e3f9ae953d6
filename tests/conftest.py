"""Shared fixtures only: the tiny GPTQ checkpoints (built by helpers/tiny.py), the code-cache setting, the test device,
and the disk: each module's folders are removed when the module ends."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import peft_qalora  # noqa: E402,F401
from helpers.tiny import build_tiny_gptq  # noqa: E402


SESSION_PREFIX = "session-"  # folders of session fixtures: kept until the session ends


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed(tmp_path_factory):
    """Remove the folders a test module made (module fixtures' and its tests') when it ends.

    A full run writes gigabytes of models (SmolLM2 cuts, GGUF files, DDP runs); kept to the end of the session, as
    pytest keeps them, they filled CI's disk. pytest's own `tmp_path_retention_policy = "failed"` removes a passed
    test's `tmp_path` at once but not `tmp_path_factory` folders; this removes those too. Failed runs keep nothing
    of finished modules: rerun the one module to look at its files."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for path in set(base.iterdir()) - before:
        if not path.name.startswith(SESSION_PREFIX):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_gptq_factory(tmp_path_factory):
    """`factory(bits=4, act_order=False)` -> folder of a cached tiny GPTQ checkpoint."""
    cache = {}

    def factory(bits: int = 4, group_size: int = 32, act_order: bool = False) -> Path:
        key = (bits, group_size, act_order)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{SESSION_PREFIX}tiny-{bits}b-g{group_size}{'-act' if act_order else ''}")
            cache[key] = build_tiny_gptq(folder, bits, group_size, act_order)
        return cache[key]

    return factory


@pytest.fixture
def tiny_gptq(tiny_gptq_factory) -> Path:
    return tiny_gptq_factory(4)


@pytest.fixture(scope="session")
def test_device():
    """The device of the device-agnostic tests (test_device_agnostic.py): $PEFT_QALORA_TEST_DEVICE, default "cpu";
    benchmarks/gpu_check.sh sets "cuda". Asking for a GPU torch cannot see fails, never skips: a check that ran
    nothing must not pass."""
    import torch

    name = os.environ.get("PEFT_QALORA_TEST_DEVICE", "cpu") or "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"PEFT_QALORA_TEST_DEVICE={name} but torch {torch.__version__} sees no CUDA GPU; install a CUDA "
                    "build of torch on a machine with one, or unset the variable to test on the CPU.")
    return device


@pytest.fixture
def code_cache_setting():
    """`set(value)`: this process's code cache (kernels.set_code_cache) in a test; the environment's comes back after."""
    from peft_qalora.tuners.kernels import set_code_cache

    yield set_code_cache
    set_code_cache(None)


@pytest.fixture(scope="session")
def tiny_spm() -> bytes:
    """A 300-piece sentencepiece model trained here on generated text."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=300,
                                   model_type="bpe", minloglevel=2)
    return model.getvalue()
