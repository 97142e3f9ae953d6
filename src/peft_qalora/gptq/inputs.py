"""What a command may read from an input folder: one rule, checked before a byte of it is read.

Design note. A model or adapter folder is data from a stranger, and the tools we hand it to (transformers'
tokenizer loader, GPTQModel, llama.cpp's converter) read more of it than our own code does: chat templates
in subfolders, tokenizer files named in `tokenizer_config.json`, every `model*.safetensors` they find.
So the rule is about the whole tree, at any depth:
- every entry is a regular file or a folder; a link must resolve inside the folder (or, for a Hugging Face
  cache snapshot, into that cache's `blobs/`) to a regular file or folder. Link loops, broken links, pipes,
  sockets and devices are refused (a pipe makes a reader hang);
- a regular file has one name only: a hard link could be another name of a file anywhere on the machine,
  and nothing can tell where its other names are;
- `tokenizer_config.json` names no file: transformers opens a `*_file` value as given (relative to the
  current folder), not inside the model folder.
`.git/` is not descended into: no loader reads it. Stdlib only.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

MAX_ENTRIES = 100_000  # a model folder holds tens of files; a tree this large is a mistake or an attack
MAX_JSON_BYTES = 64 << 20  # configs and indexes are kilobytes; a tokenizer.json a few MB
SKIPPED = (".git",)


def allowed_roots(folder: Path) -> list[Path]:
    """Where links from `folder` may point: the folder itself, and a Hugging Face cache snapshot's `blobs/`."""
    root = Path(folder).resolve()
    roots = [root]
    if root.parent.name == "snapshots":  # hub cache: <repo>/snapshots/<rev>/file -> ../../blobs/<hash>
        roots.append(root.parent.parent / "blobs")
    return roots


def check_input_folder(folder, owner: str) -> None:
    """Refuse `folder` unless every entry, at any depth, follows the rule of the design note."""
    root = Path(folder)
    if not root.is_dir():
        what = "does not exist" if not os.path.lexists(root) else "is not a folder"
        raise FileNotFoundError(f"{owner}: {root} {what}; pass a model or adapter folder.")
    roots, pending, count = allowed_roots(root), [root], 0
    while pending:
        current = pending.pop()
        for entry in _list(current, owner):
            count += 1
            if count > MAX_ENTRIES:
                raise ValueError(f"{owner}: {root} holds more than {MAX_ENTRIES:,} files and folders; a model folder "
                                 "holds tens. Pass the folder with the model's own files only.")
            path = Path(entry.path)
            if entry.is_symlink():
                check_link(path, roots, owner)
            elif entry.is_dir(follow_symlinks=False):
                if entry.name not in SKIPPED:
                    pending.append(path)
            else:
                check_regular(path, entry.stat(follow_symlinks=False), owner)
    check_tokenizer_config(root, owner)


def _list(folder: Path, owner: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as err:
        raise ValueError(f"{owner}: cannot list {shown(folder)} ({err.strerror}); make it readable.") from None


def check_link(path: Path, roots: list[Path], owner: str) -> None:
    """A link must resolve inside one of `roots` to a regular file or a folder."""
    try:
        target = path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        raise ValueError(f"{owner}: {shown(path)} is a link loop; replace it with the file it stands for.") from None
    except OSError as err:
        problem = "a link loop" if err.errno == 40 else "a broken link"
        raise ValueError(f"{owner}: {shown(path)} is {problem}; replace it with the file it stands for.") from None
    if not any(target.is_relative_to(root) for root in roots):
        raise ValueError(
            f"{owner}: {shown(path)} is a link to {shown(target)}, outside the model folder; peft-qalora reads (and "
            "copies into its outputs) only files inside the folder. Replace the link with a copy of the file you mean.")
    info = target.stat()
    if not stat.S_ISDIR(info.st_mode):
        check_regular(path, info, owner)


def check_regular(path: Path, info: os.stat_result, owner: str) -> None:
    """A regular file with one name; anything else is refused, naming what it is."""
    if not stat.S_ISREG(info.st_mode):
        kind = ("a named pipe" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file")
        raise ValueError(f"{owner}: {shown(path)} is {kind}; a model folder holds regular files only. Remove it.")
    if info.st_nlink > 1:
        raise ValueError(
            f"{owner}: {shown(path)} is a hard link ({info.st_nlink} names for one file), which may be a file from "
            f"elsewhere on this machine; replace it with a copy of its own (cp --remove-destination SRC {path.name}).")


def check_tokenizer_config(folder: Path, owner: str) -> None:
    """`tokenizer_config.json` may not name files: transformers would open them relative to the current folder."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = read_json(path, owner, "tokenizer_config.json")
    named = sorted(k for k, v in config.items() if k.endswith("_file") and isinstance(v, str))
    if named:
        raise ValueError(
            f"{owner}: {shown(path)} names files by path ({', '.join(f'{k}={config[k]!r}' for k in named)}); "
            "transformers would open them relative to the current folder, not the model folder. Delete those keys: "
            "the tokenizer's files are found in the folder by their standard names.")


def read_json(path: Path, owner: str, what: str) -> dict:
    """A JSON object from a checked file, bounded in size and depth; raises naming the file and the fix."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{owner}: {shown(path)} is {size:,} bytes, far more than any {what}; restore {what}.")
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSON, and ints of 4,300+ digits
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise ValueError(f"{owner}: {shown(path)} is not valid JSON ({reason}); restore {what} from the "
                         "checkpoint's source.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{owner}: {shown(path)} holds a JSON {type(value).__name__}, not an object; restore {what}.")
    return value


def shown(text) -> str:
    """`text` with control characters escaped, so a hostile file or tensor name cannot drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
