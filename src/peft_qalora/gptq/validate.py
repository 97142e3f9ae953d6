"""Is this GPTQ folder what it says? The checks every command runs on a model folder before any work.

Design note. A model folder is data from a stranger: its index can name files anywhere on the
machine, its safetensors headers can claim ranges the file does not hold, its config can describe
tensors other than those stored. Everything read from it is checked here, cheapest first, and every
refusal names the file, the tensor and the fix:
1. `config.json`: valid JSON holding a GPTQ `quantization_config` (bits 2/3/4/8, group size -1 or
   positive, a zero convention we know, no per-module `dynamic` overrides).
2. Files: the whole tree follows `inputs.py`'s rule (regular files inside the folder at any depth, a
   Hugging Face cache snapshot's links into its own `blobs/` excepted), checked before anything is
   read; shard names from `model.safetensors.index.json` are plain file names inside the folder; the
   index and the shards' headers agree, no tensor is stored twice.
3. safetensors headers (`header.py`): a sane length, known dtypes, byte sizes that match shapes,
   ranges inside the file, contiguous and non-overlapping.
4. Every quantized linear (the prefix of a `.qweight`), against gptq-format.md: dtypes and shapes of
   `qweight`, `qzeros`, `scales`, `g_idx` from the headers; the values of `g_idx` (in range, every
   group exactly `group_size` members) and `scales` (finite, non-zero; negative is legal: the
   mirrored grid of base/quantize.py) read with numpy: a few MB per layer. Codes are never read.
Stdlib and numpy only, no torch: the merge command runs this before importing torch.
"""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ..names import GPTQ_SUFFIXES, SUPPORTED_BITS
from .header import OWNER, TensorEntry, is_int, read_header
from .inputs import allowed_roots, check_input_folder, read_json, shown

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_DTYPES = ("F16", "BF16", "F32")
CORRUPT = "The file is damaged or was not written by a GPTQ quantizer: download it again, or re-quantize the " \
          "float model (peft-qalora quantize MODEL_DIR OUT_DIR)"
PER_CHANNEL = (
    "is quantized per channel (group_size -1: one scale and zero per output column for all its inputs). QA-LoRA "
    "pools the inputs of each quantization group, so here all inputs would pool into one: an adapter could learn "
    "one number per output column (an update proportional to the sum of the inputs, like a bias; a rank above 1 "
    "adds nothing), and a merge would move each column's single zero point. Such a checkpoint loads, runs and "
    "merges, but peft-qalora refuses to train QA-LoRA on it and its exports write grouped layouts only. Re-quantize "
    "the float model with groups: peft-qalora quantize MODEL_DIR OUT_DIR --group-size 128 (or 32, 64)"
)


@dataclass(frozen=True)
class QuantLayer:
    """One quantized linear, as checked."""

    name: str
    in_features: int
    out_features: int
    n_groups: int
    act_order: bool  # groups scattered over the inputs (g_idx is not arange // group_size)


@dataclass
class Checkpoint:
    """A GPTQ folder that passed every check."""

    folder: Path
    quant_config: dict
    shards: list[Path]
    tensors: dict[str, TensorEntry]
    layers: dict[str, QuantLayer] = field(default_factory=dict)

    @property
    def per_channel(self) -> bool:
        return self.quant_config["group_size"] == -1


def check_checkpoint(folder) -> Checkpoint:
    """Every check above on the folder `folder`; raises ValueError / FileNotFoundError naming the fix."""
    folder = Path(folder)
    check_input_folder(folder, OWNER)  # the whole tree, at any depth, before a byte of it is read (inputs.py)
    quant = read_quant_config(folder)
    shards, tensors = read_shards(folder)
    ckpt = Checkpoint(folder, quant, shards, tensors)
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    if not names:
        raise ValueError(
            f"{OWNER}: {folder}/config.json describes a GPTQ checkpoint but no shard holds a *.qweight tensor: the "
            "weights are not quantized (a float model with a stray quantization_config?). Remove quantization_config "
            "from config.json to use it as a float model, or quantize it: peft-qalora quantize MODEL_DIR OUT_DIR."
        )
    for name in names:
        ckpt.layers[name] = check_layer(ckpt, name)
    _check_quantized_modules(ckpt)
    return ckpt


# ----------------------------------------------------------------------------------------- config


def read_config(folder) -> dict:
    """config.json as a dict; raises naming the file when it is missing or not a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{OWNER}: {folder} has no config.json; pass a GPTQ checkpoint folder.")
    return _read_json(path, "config.json")


def read_quant_config(folder) -> dict:
    """The checkpoint's quantization config, checked; raises when the folder is not a GPTQ checkpoint we can read."""
    folder = Path(folder)
    quant = read_config(folder).get("quantization_config")
    if quant is None and (folder / "quantize_config.json").is_file():
        raise ValueError(
            f"{OWNER}: {folder} is not a GPTQ checkpoint transformers can load: it has quantize_config.json (the older "
            "AutoGPTQ layout) but config.json has no quantization_config. Copy the fields of quantize_config.json "
            'into config.json as "quantization_config", with "quant_method": "gptq".'
        )
    if not isinstance(quant, dict) or quant.get("quant_method") != "gptq":
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise ValueError(
            f"{OWNER}: {folder} is not a GPTQ checkpoint (config.json quantization_config.quant_method={method!r}); "
            "make one with `peft-qalora quantize MODEL_DIR OUT_DIR`."
        )
    where = f"{folder}/config.json quantization_config"
    bits, group_size = quant.get("bits"), quant.get("group_size")
    if not is_int(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{OWNER}: {where} has bits={bits!r}; GPTQ stores 2, 3, 4 or 8 bits. {CORRUPT}.")
    if not is_int(group_size) or not (group_size == -1 or group_size > 0):
        raise ValueError(
            f"{OWNER}: {where} has group_size={group_size!r}; GPTQ takes a positive group size (inputs sharing a "
            f"scale and zero) or -1 (per channel). {CORRUPT}."
        )
    fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"{OWNER}: {where} has checkpoint_format={fmt!r}; peft-qalora reads 'gptq' (v1) and 'gptq_v2'. Convert "
            "it with GPTQModel (save with format='gptq') first."
        )
    if quant.get("dynamic"):
        raise ValueError(
            f"{OWNER}: {where} has `dynamic` per-module overrides (other bits or group sizes for some layers); "
            "peft-qalora handles one bits/group_size for the whole model. Re-quantize without `dynamic`."
        )
    return quant


def _check_quantized_modules(ckpt: Checkpoint) -> None:
    """optimum quantizes only the modules these keys select; a stored layer left out loads with random weights."""
    for key in ("block_name_to_quantize", "modules_in_block_to_quantize"):
        value = ckpt.quant_config.get(key)
        left_out = [n for n in ckpt.layers if value is not None and not _selected(key, value, n)]
        if left_out:
            raise ValueError(
                f"{OWNER}: {ckpt.folder}/config.json has quantization_config.{key}={value!r}, which leaves "
                f"{left_out[0]} ({len(left_out)} layers) unquantized, but "
                f"{ckpt.tensors[left_out[0] + '.qweight'].file.name} holds it quantized: transformers would load it "
                f"with random weights. Remove {key} from config.json."
            )


def _selected(key: str, value, name: str) -> bool:
    """Whether optimum's `convert_model` quantizes the module `name` under the config's `key`."""
    if key == "block_name_to_quantize":
        return isinstance(value, str) and name.startswith(value + ".")
    groups = value if isinstance(value, list) else []
    return any(isinstance(m, str) and name.endswith(m) for g in groups if isinstance(g, list) for m in g)


# ------------------------------------------------------------------------------------------ files


def read_shards(folder) -> tuple[list[Path], dict[str, TensorEntry]]:
    """The checkpoint's shards (index order) and every tensor of their headers, with the index checked."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    weight_map = None
    if index.is_file():
        weight_map = _weight_map(index)
        names = sorted(set(weight_map.values()))
        if not names:
            raise ValueError(f"{OWNER}: {index} has an empty weight_map. {CORRUPT}.")
    elif (folder / SINGLE_NAME).exists() or (folder / SINGLE_NAME).is_symlink():
        names = [SINGLE_NAME]
    else:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        extra = (f" It holds {pickles}: peft-qalora never loads pickles (they can run code); ask for a safetensors "
                 "checkpoint or convert it yourself where you trust it.") if pickles else ""
        raise FileNotFoundError(f"{OWNER}: no {SINGLE_NAME} or {INDEX_NAME} in {folder}.{extra}")
    source = INDEX_NAME if weight_map is not None else SINGLE_NAME
    shards = [shard_path(folder, name, source) for name in names]
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        for key, entry in read_header(shard, CORRUPT).items():
            if key in tensors:
                raise ValueError(
                    f"{OWNER}: tensor {key} is stored twice, in {tensors[key].file.name} and {shard.name} of {folder}; "
                    f"a loader would pick one at random. {CORRUPT}."
                )
            tensors[key] = entry
    if weight_map is not None:
        _check_index_agrees(index, weight_map, tensors)
    return shards, tensors


def shard_path(folder: Path, name, source: str) -> Path:
    """`folder / name` for a shard named in `source`, refused unless it is a plain file inside the folder."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
             and PurePosixPath(name).name == name and PureWindowsPath(name).name == name)
    if not plain:
        raise ValueError(
            f"{OWNER}: {folder / source} names the shard {name!r}, which is not a plain file name: an absolute path "
            f"or `..` would make us read (and copy into the output) a file elsewhere on this machine. Shards must "
            f"sit in {folder}; fix the weight_map or download the checkpoint again."
        )
    if not name.endswith(".safetensors"):
        raise ValueError(
            f"{OWNER}: {folder / source} names the shard {name!r}; shards are *.safetensors files (peft-qalora never "
            "loads pickles). Fix the weight_map or download the checkpoint again."
        )
    path = folder / name
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(
            f"{OWNER}: {folder / source} lists the shard {name} but {folder} has no such file (an interrupted "
            "download?); download the missing shard."
        )
    check_inside(folder, path)
    return path


def check_inside(folder: Path, path: Path) -> None:
    """Refuse a file that is not a regular file resolving inside `folder` (or its HF cache `blobs/`)."""
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in allowed_roots(folder)):
        raise ValueError(
            f"{OWNER}: {shown(path)} is a link to {shown(target)}, outside the model folder; peft-qalora reads (and "
            "copies into its outputs) only files inside the folder. Replace the link with a copy of the file you mean."
        )
    if not path.exists() or not stat.S_ISREG(path.stat().st_mode):
        raise ValueError(f"{OWNER}: {shown(path)} is not a regular file (a broken link, a folder, a device or a "
                         "pipe); replace it with the file it stands for.")


def _weight_map(index: Path) -> dict:
    weight_map = _read_json(index, INDEX_NAME).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{OWNER}: {index} has no weight_map object (tensor name -> shard file). {CORRUPT}.")
    return weight_map


def _check_index_agrees(index: Path, weight_map: dict, tensors: dict[str, TensorEntry]) -> None:
    for key, shard in weight_map.items():
        if key not in tensors:
            raise ValueError(
                f"{OWNER}: {index} says tensor {key} is in {shard}, but no shard holds it (a truncated or replaced "
                f"shard?). {CORRUPT}."
            )
        if tensors[key].file.name != shard:
            raise ValueError(f"{OWNER}: {index} says tensor {key} is in {shard}, but it is in "
                             f"{tensors[key].file.name}. {CORRUPT}.")
    unlisted = sorted(set(tensors) - set(weight_map))
    if unlisted:
        raise ValueError(
            f"{OWNER}: {tensors[unlisted[0]].file} holds {len(unlisted)} tensors that {index.name} does not list "
            f"(e.g. {unlisted[0]}): loaders that follow the index would skip them. {CORRUPT}."
        )


def _read_json(path: Path, what: str) -> dict:
    check_inside(path.parent, path)  # before reading: a link elsewhere is refused unread
    return read_json(path, OWNER, what)


# ---------------------------------------------------------------------------------- quantized layers


def check_layer(ckpt: Checkpoint, name: str) -> QuantLayer:
    """Dtypes and shapes of one quantized linear from the headers, then its g_idx and scales values."""
    bits, group_size = ckpt.quant_config["bits"], ckpt.quant_config["group_size"]
    parts = _layer_tensors(ckpt, name)
    file = parts["qweight"].file
    _expect_dtype(parts, name, "qweight", ("I32",))
    _expect_dtype(parts, name, "qzeros", ("I32",))
    _expect_dtype(parts, name, "g_idx", ("I32",))
    _expect_dtype(parts, name, "scales", SCALE_DTYPES)
    if len(parts["g_idx"].shape) != 1 or len(parts["scales"].shape) != 2:
        raise ValueError(f"{OWNER}: {file}: {name}.g_idx is {list(parts['g_idx'].shape)} and {name}.scales "
                         f"{list(parts['scales'].shape)}; expected [in] and [n_groups, out]. {CORRUPT}.")
    (in_features,), (n_groups, out) = parts["g_idx"].shape, parts["scales"].shape
    per_block = 32 // math.gcd(32, bits)  # values per whole number of int32 words
    if not in_features or not out or in_features % per_block or out % per_block:
        raise ValueError(f"{OWNER}: {file}: {name} is {in_features} inputs x {out} outputs; {bits}-bit packing needs "
                         f"both multiples of {per_block}. {CORRUPT}.")
    _expect_shape(parts, name, "qweight", (in_features * bits // 32, out), f"{bits}-bit codes of {in_features} inputs")
    _expect_shape(parts, name, "qzeros", (n_groups, out * bits // 32), f"{bits}-bit zeros of {out} outputs")
    _check_groups(file, name, in_features, n_groups, group_size, ckpt.folder)
    if "bias" in parts and parts["bias"].shape != (out,):
        raise ValueError(f"{OWNER}: {file}: {name}.bias is {list(parts['bias'].shape)}, expected [{out}]. {CORRUPT}.")
    g_idx = _read(parts["g_idx"])
    _check_g_idx(file, name, g_idx, n_groups, group_size)
    _check_scales(file, name, _read(parts["scales"]))
    act_order = group_size > 0 and not np.array_equal(g_idx, np.arange(in_features) // group_size)
    return QuantLayer(name, in_features, out, n_groups, bool(act_order))


def _layer_tensors(ckpt: Checkpoint, name: str) -> dict[str, TensorEntry]:
    parts = {s: ckpt.tensors[f"{name}.{s}"] for s in (*GPTQ_SUFFIXES, "bias") if f"{name}.{s}" in ckpt.tensors}
    missing = [s for s in GPTQ_SUFFIXES if s not in parts]
    if missing:
        raise ValueError(
            f"{OWNER}: {parts['qweight'].file} holds {name}.qweight but the checkpoint has no "
            f"{', '.join(f'{name}.{s}' for s in missing)}; a GPTQ linear needs qweight, qzeros, scales and g_idx. "
            f"{CORRUPT}."
        )
    return parts


def _expect_dtype(parts: dict, name: str, suffix: str, dtypes: tuple) -> None:
    entry = parts[suffix]
    if entry.dtype not in dtypes:
        raise ValueError(f"{OWNER}: {entry.file}: {name}.{suffix} is {entry.dtype}; GPTQ stores it as "
                         f"{' / '.join(dtypes)}. {CORRUPT}.")


def _expect_shape(parts: dict, name: str, suffix: str, expected: tuple, what: str) -> None:
    entry = parts[suffix]
    if entry.shape != expected:
        raise ValueError(f"{OWNER}: {entry.file}: {name}.{suffix} is {list(entry.shape)} but {what} take "
                         f"{list(expected)} (gptq-format: [in*bits/32, out] and [n_groups, out*bits/32]): "
                         f"config.json's bits or the tensor is wrong. {CORRUPT}.")


def _check_groups(file: Path, name: str, in_features: int, n_groups: int, group_size: int, folder: Path) -> None:
    if group_size == -1:
        expected = 1
    elif in_features % group_size:
        raise ValueError(
            f"{OWNER}: {folder}/config.json has group_size={group_size} but {name} ({file.name}) has {in_features} "
            f"inputs, not a whole number of groups; GPTQ groups divide the inputs. {CORRUPT}."
        )
    else:
        expected = in_features // group_size
    if n_groups != expected:
        raise ValueError(
            f"{OWNER}: {file}: {name}.scales has {n_groups} groups but {in_features} inputs in groups of "
            f"{group_size} (config.json) make {expected}; the config and the tensors disagree. {CORRUPT}."
        )


def _check_g_idx(file: Path, name: str, g_idx: np.ndarray, n_groups: int, group_size: int) -> None:
    bad = np.flatnonzero((g_idx < 0) | (g_idx >= n_groups))
    if bad.size:
        raise ValueError(f"{OWNER}: {file}: {name}.g_idx[{bad[0]}] = {g_idx[bad[0]]}, outside the layer's groups "
                         f"[0, {n_groups}). {CORRUPT}.")
    counts = np.bincount(g_idx, minlength=n_groups)
    wrong = np.flatnonzero(counts != counts[0]) if group_size == -1 else np.flatnonzero(counts != group_size)
    if wrong.size:
        raise ValueError(
            f"{OWNER}: {file}: {name}.g_idx puts {counts[wrong[0]]} inputs in group {wrong[0]}, but every GPTQ group "
            f"holds exactly group_size={group_size} (act-order only scatters them). {CORRUPT}."
        )


def _check_scales(file: Path, name: str, scales: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(scales) | (scales == 0))
    if bad.size:
        g, o = divmod(int(bad[0]), scales.shape[1])
        raise ValueError(
            f"{OWNER}: {file}: {name}.scales[{g}, {o}] = {scales[g, o]} ({bad.size} such); scales must be finite and "
            f"non-zero (negative is fine: a mirrored grid). {CORRUPT}."
        )


def _read(entry: TensorEntry) -> np.ndarray:
    """A small tensor's values (g_idx, scales) straight from the file."""
    count = math.prod(entry.shape)
    if entry.dtype == "BF16":  # numpy has no bfloat16: widen the 16 bits into float32's top half
        raw = np.fromfile(entry.file, dtype="<u2", count=count, offset=entry.start)
        values = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.fromfile(entry.file, dtype={"I32": "<i4", "F16": "<f2", "F32": "<f4"}[entry.dtype], count=count,
                             offset=entry.start)
    return values.reshape(entry.shape)
