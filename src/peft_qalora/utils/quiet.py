"""Keeping the libraries' chatter out of the CLI's output: `library_chatter(verbose)`.

Without it a `peft-qalora` run prints GPTQModel's per-layer tables and INFO lines, transformers'
"Loading weights" bars and warnings, torch and bitsandbytes import-time warnings and a deprecation
warning, around the few lines that matter. Quiet mode (the CLI's default; `--verbose` turns it off)
lowers each library's own log level and filters exactly that warning, by message; our progress bars
(tqdm on stderr: merge, export, perplexity), Trainer's training bar and GPTQModel's quantization
bars still show.

How each library is reached:
- GPTQModel logs through the `logbar` package: one shared `LogBar` (a `logging.Logger` named
  "logbar") that prints straight to stdout. It is created at INFO when GPTQModel is imported, so we
  create it first (it is cheap: no torch) and raise its level; its progress bars are not log
  records and stay.
- transformers and datasets set their level from TRANSFORMERS_VERBOSITY / DATASETS_VERBOSITY when
  first imported (transformers' bars follow HF_HUB_DISABLE_PROGRESS_BARS); already imported, they
  are set directly. Importing them here would cost the file-to-file merge, which never loads them,
  about 2 s.
- torch, bitsandbytes, peft, tokenicer: plain `logging` loggers.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

QUIET_LEVEL = logging.ERROR

LOGGER_LEVELS = {
    "peft": QUIET_LEVEL,
    "torch.utils._pytree": QUIET_LEVEL,  # torchao's import: "<enum ...> is an Enum subclass and is now natively ..."
    "torch.utils.cpp_extension": QUIET_LEVEL,  # GPTQModel's import: "No CUDA runtime is found"
    "bitsandbytes": QUIET_LEVEL,  # its import: "Failed to load CPU gemm_4bit_forward from kernels-community"
    "tokenicer": QUIET_LEVEL,  # GPTQModel's tokenizer wrapper: "Auto fixed pad_token_id"
    # TrainingArguments.disable_tqdm defaults to "this logger hides warnings": at WARNING, Trainer keeps its
    # progress bar (and prints its loss dicts through it) while the rest of transformers is quiet.
    "transformers.training_args": logging.WARNING,
    # Our own INFO lines reach the terminal only because tokenicer's import calls logging.basicConfig(level=INFO).
    "peft_qalora": logging.WARNING,
}

QUIET_WARNINGS = (
    # peft's PeftModel.__init__ reads transformers' deprecated property; fixed in neither yet.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", "transformers"),
)

_quiet = False


@contextlib.contextmanager
def library_chatter(verbose: bool) -> Iterator[None]:
    """Within the block, libraries log errors only (unless `verbose`); everything is restored after.

    A library first imported inside the block keeps the quiet level it read from the environment.
    Inside a quiet block, a nested one changes nothing (verbose or not).
    """
    global _quiet
    if verbose or _quiet:
        yield
        return
    with contextlib.ExitStack() as stack:
        for name, level in LOGGER_LEVELS.items():
            _set_level(stack, logging.getLogger(name), level)
        _quiet_logbar(stack)
        _quiet_hf_library(stack, "transformers", "TRANSFORMERS_VERBOSITY", progress_bars=True)
        _quiet_hf_library(stack, "datasets", "DATASETS_VERBOSITY")
        stack.enter_context(warnings.catch_warnings())
        for category, message, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        _quiet = True
        try:
            yield
        finally:
            _quiet = False


@contextlib.contextmanager
def muted_stdout() -> Iterator[None]:
    """In quiet mode, drop what the block prints to stdout: for library calls that `print()` their
    chatter (GPTQModel's `save` prints the saved config.json). A no-op otherwise."""
    if not _quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _set_level(stack: contextlib.ExitStack, logger: logging.Logger, level: int) -> None:
    stack.callback(logger.setLevel, logger.level)
    logger.setLevel(level)


def _quiet_logbar(stack: contextlib.ExitStack) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # creating it prints a blank line (and a headless notice)
        try:
            from logbar import LogBar
        except ImportError:  # GPTQModel not installed: nothing of it to quiet
            return
        logger = LogBar.shared()
    _set_level(stack, logger, QUIET_LEVEL)


def _quiet_hf_library(stack: contextlib.ExitStack, name: str, env_var: str, progress_bars: bool = False) -> None:
    if name not in sys.modules:
        _set_env(stack, env_var, "error")
        if progress_bars and "huggingface_hub" not in sys.modules:
            _set_env(stack, "HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what transformers' bars follow at import
        return
    hf_logging = importlib.import_module(f"{name}.utils.logging")
    stack.callback(hf_logging.set_verbosity, hf_logging.get_verbosity())
    hf_logging.set_verbosity_error()
    if progress_bars and hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        stack.callback(hf_logging.enable_progress_bar)


def _set_env(stack: contextlib.ExitStack, key: str, value: str) -> None:
    old = os.environ.get(key)
    os.environ[key] = value
    if old is None:
        stack.callback(os.environ.pop, key, None)
    else:
        stack.callback(os.environ.__setitem__, key, old)
