"""llama.cpp's own converter, with our Q4_1 blocks in place of its output for the quantized linears.

Design note. `convert_hf_to_gguf.py` (and its `conversion/` package and `gguf-py`) ship in the
llama-cpp-python sdist under `vendor/llama.cpp/`; `converter_dir()` downloads that sdist once with
pip and unpacks those three into the cache. The converter needs ITS `gguf-py` (newer than the `gguf`
wheel transformers uses), so it runs in a child process (`python -I`, started by `run_converter`, running
`peft_qalora.exports.gguf.llamacpp.main`) whose import path we set, llama.cpp's gguf-py first. There, the
architecture's own model class (`LlamaModel` for LLaMA and Mistral, `Qwen2Model`, `Qwen3Model`, ...: the
converter's registry picks it from config.json) is subclassed in two places and otherwise runs unchanged, so
metadata, tokenizer, embeddings, norms and
the output head are exactly what llama.cpp writes:

- `dequant_model`: each GPTQ linear's four tensors become one `*.weight` entry (a shape-only meta
  tensor), so the converter's own GPTQ dequantization never runs;
- `modify_tensors`: for those entries, the class's own `modify_tensors` runs on a tensor whose every
  element is its row index. Whatever it does (LLaMA: the q/k rotary permutation, the name mapping)
  must come back as whole rows moved, which is checked; the same row order is applied to our Q4_1
  rows, handed to the writer as a lazy tensor computed only when its turn to be written comes, so
  memory stays about one layer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ...names import GPTQ_SUFFIXES
from ...utils.threads import threads_for

TABLE_CHUNK_BYTES = 16 << 20  # rows of a float table read, converted and written at a time

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")
CONVERTER_NAME = f"llama.cpp convert_hf_to_gguf.py from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"


# --- in the calling process ---------------------------------------------------------------------------


def converter_dir() -> Path:
    """The cached folder holding llama.cpp's `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`."""
    from ...assets import cache_dir
    from ...utils.atomic import atomic_cache_dir

    final = cache_dir() / f"llama.cpp-convert-{LLAMA_CPP_PYTHON_VERSION}"
    if (final / "convert_hf_to_gguf.py").is_file():
        return final
    sdist = _download_sdist()
    with atomic_cache_dir(final, "export gguf") as tmp:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive.getmembers():
                rel = member.name.removeprefix(_VENDOR)
                if member.isfile() and rel != member.name and rel.startswith(_KEEP) and "__pycache__" not in rel:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(archive.extractfile(member).read())
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"export gguf: {sdist} holds no {_VENDOR}convert_hf_to_gguf.py; delete it and retry.")
    return final


def _download_sdist() -> Path:
    from ...assets import AssetError, downloads_dir

    dest = downloads_dir()
    if (dest / SDIST).is_file():
        return dest / SDIST
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (dest / SDIST).is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"assets: `pip download --no-deps --no-binary :all: {spec}` failed (exit code {proc.returncode}); the GGUF "
            f"export needs llama.cpp's converter from that sdist. pip said:\n{tail}\nPlace {SDIST} in {dest} by hand.")
    return dest / SDIST


# The child's whole import path, set by us: `-I` keeps out the current folder, PYTHONPATH and the user's
# site-packages, so nothing in the folder the user runs from (a planted `json.py`) or in the model folder runs.
_CHILD = ("import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
          "from peft_qalora.exports.gguf.llamacpp import main; sys.exit(main(sys.argv[2:]))")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def child_path(converter: Path) -> list[str]:
    """llama.cpp's gguf-py and converter first, then the folder holding this package (and the user site where
    the parent uses it: `pip install --user`)."""
    import site

    import peft_qalora

    paths = [str(converter / "gguf-py"), str(converter), str(Path(peft_qalora.__file__).resolve().parents[1])]
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    return paths + ([user_site] if user_site and user_site in sys.path else [])


def stage_folder(src: Path, shards: list[Path], staged: Path) -> Path:
    """A folder of links to exactly the checked files of `src` (its whole tree passed `gptq.inputs`): the checked
    shards and no other safetensors, no pickle. llama.cpp's converter takes every `model*.safetensors` it finds."""
    keep = {Path(s).name for s in shards}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if ".git" in rel.parts or path.is_dir() or path.suffix in _PICKLES:
            continue
        if path.suffix == ".safetensors" and (len(rel.parts) > 1 or rel.name not in keep):
            continue
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).symlink_to(path.resolve())
    return staged


def run_converter(converter: Path, src: Path, shards: list[Path], out: Path, merge: dict | None,
                  progress: bool, embeddings: str = "f16") -> dict:
    """Run the conversion in an isolated child process (fixed import path, a folder of ours as its working
    folder, the converter shown only the checked files); returns its summary."""
    with tempfile.TemporaryDirectory(prefix="peft-qalora-gguf-") as tmp:
        result, staged = Path(tmp) / "result.json", stage_folder(src, shards, Path(tmp) / "model")
        # absolute: the child runs in `tmp`, where a path relative to the user's folder means nothing
        src, out = Path(os.path.abspath(src)), Path(os.path.abspath(out))
        merge = dict(merge, adapter=os.path.abspath(merge["adapter"])) if merge else merge
        request = {"src": str(src), "staged": str(staged), "out": str(out), "merge": merge, "result": str(result),
                   "progress": progress, "embeddings": embeddings}
        env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH", "PYTHONSTARTUP")}
        cmd = [sys.executable, "-I", "-c", _CHILD, json.dumps(child_path(converter)), json.dumps(request)]
        pipe = None if progress else subprocess.PIPE
        proc = subprocess.run(cmd, env=env, cwd=tmp, stdout=pipe, stderr=pipe, text=True)
        answer = json.loads(result.read_text()) if result.is_file() else {}
    if answer.get("error") == "OSError":
        raise OSError(answer["errno"], answer["message"], answer["file"] or str(out))
    if "error" in answer:  # a refusal of this model (ours or the converter's), before a tensor was written
        raise ValueError(answer["message"])
    if proc.returncode != 0 or "summary" not in answer:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        raise RuntimeError(f"export gguf: llama.cpp's converter stopped (exit code {proc.returncode}).\n{tail}")
    return answer["summary"]


# --- in the child process ----------------------------------------------------------------------------


class Q4_1Source:
    """The GPTQ folder's quantized linears as Q4_1 rows, an adapter folded in if asked; one layer at a time."""

    def __init__(self, src: Path, merge: dict | None):
        from ...merge.adapters import read_adapter
        from ...gptq import checkpoint as ckpt
        from ..stream import quantized_layers

        quant = ckpt.read_quant_config(src)
        self.bits, self.zero_format = int(quant["bits"]), ckpt.zero_format_of(quant)
        self.reader = ckpt.ShardReader(src)
        self.names = quantized_layers(self.reader)
        self.adapters = read_adapter(merge["adapter"])[1] if merge else {}
        self.integer_shifts = bool(merge and merge["integer_shifts"])
        self.terms: dict = {}
        # The writer asks for tensors in the order they were queued, each a (layer, row order) entry; the next
        # ones are converted, rows in order, on the other cores while it writes this one (numpy and torch release
        # the GIL), as many as `utils.threads` allows for the largest layer (a conversion holds its codes about
        # four times over, its result and the writer's layer two more: measured 450 MB a 70B MLP, on top of the
        # converter's 675 MB), so memory stays a few layers and the writer's thread only writes.
        self.queued: list[tuple[str, np.ndarray | None]] = []
        largest = max((self.reader.entries[f"{name}.qweight"] for name in self.names), default=None,
                      key=lambda entry: entry.end - entry.start)
        self.ahead = threads_for(6 * (largest.end - largest.start)) if largest else 1
        self._next, self._ahead = 0, {}
        self._pool = ThreadPoolExecutor(self.ahead, thread_name_prefix="q4_1-ahead")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def table_chunks(self, name: str, shape: tuple[int, ...]) -> tuple[list, type] | None:
        """Loaders of the float table `name` (a token embedding, an output head) a few MB of rows at a time, as
        llama.cpp's converter hands tensors on (fp16 and fp32 as they are, others as fp32), and their numpy dtype;
        None unless the folder holds `name` as a float tensor of that shape."""
        from ...gptq.streaming import read_entry

        entry = self.reader.entries.get(name)
        if entry is None or len(shape) != 2 or tuple(entry.shape) != tuple(shape) or entry.dtype not in (
                "F16", "F32", "BF16"):
            return None
        rows, cols = shape
        row_bytes = (entry.end - entry.start) // max(rows, 1)
        step = max(1, TABLE_CHUNK_BYTES // max(row_bytes, 1))

        def loader(first: int, last: int):
            def load() -> np.ndarray:
                part = read_entry(dataclasses.replace(entry, shape=(last - first, cols), start=entry.start + first * row_bytes,
                                                      end=entry.start + last * row_bytes))
                return (part if part.dtype in (torch.float16, torch.float32) else part.float()).numpy()
            return load

        return [loader(a, min(a + step, rows)) for a in range(0, rows, step)], (
            np.float16 if entry.dtype == "F16" else np.float32)

    def shape(self, name: str) -> tuple[int, int]:
        n_groups, out = self.reader.shape(f"{name}.scales")
        return out, self.reader.shape(f"{name}.g_idx")[0]

    def blocks(self, entry: tuple[str, np.ndarray | None]) -> np.ndarray:
        """A queued entry's Q4_1 rows: the ones converted ahead if the writer asks in queue order, then the next
        started."""
        position, self._next = self._next, self._next + 1
        for later in range(position + 1, min(position + 1 + self.ahead, len(self.queued))):
            if later not in self._ahead:
                self._ahead[later] = self._pool.submit(self.ordered, *self.queued[later])
        ahead = self._ahead.pop(position, None)
        if ahead is not None and self.queued[position] is entry:
            return ahead.result()
        return self.ordered(*entry)

    def ordered(self, name: str, order: np.ndarray | None) -> np.ndarray:
        """`name`'s rows, row `i` of the result being the layer's row `order[i]` (all of them, as they are, for None)."""
        blocks = self.convert(name)
        return blocks if order is None else blocks[order]

    def convert(self, name: str) -> np.ndarray:
        from .q4_1 import q4_1_blocks, q4_1_blocks_packed, q4_1_terms
        from ..stream import read_layer

        tensors = read_layer(self.reader, name, self.bits, self.zero_format)
        terms = q4_1_terms(tensors, self.adapters.get(name), name, self.integer_shifts)
        self.terms[name] = {"max_m_rounding_error": terms.max_m_error, "mean_abs_shift": terms.mean_abs_shift,
                            "integer_zeros": terms.integer_zeros}  # numbers only: memory stays one layer
        if self.bits == 4 and tensors.qweight.shape[0] * 8 == tensors.in_features:
            return q4_1_blocks_packed(tensors.qweight, terms.d, terms.m)
        return q4_1_blocks(tensors.codes(torch.uint8), terms.d, terms.m)  # 2/3 bits widened


def row_order(moved: torch.Tensor, out: int, n_in: int, name: str) -> np.ndarray | None:
    """Which source row each row of `moved` holds, where `moved` is a row-index tensor after the converter's
    transformations (None: every row where it was); raises unless they moved whole rows (only then do Q4_1
    blocks stay intact)."""
    first = moved[:, :1] if moved.ndim == 2 else None
    if first is None or moved.shape[1] != n_in or not torch.equal(moved, first.expand_as(moved)):
        raise NotImplementedError(
            f"export gguf: llama.cpp's converter transforms {name} beyond moving whole output rows (shape "
            f"{tuple(moved.shape)} from ({out}, {n_in})); Q4_1 blocks cannot follow that. This architecture is not "
            "supported by the GGUF export.")
    order = first[:, 0].long()
    if not torch.equal(order.float(), first[:, 0]) or int(order.min()) < 0 or int(order.max()) >= out:
        raise NotImplementedError(f"export gguf: llama.cpp's converter mixes the rows of {name}; not supported.")
    return None if torch.equal(order, torch.arange(out)) else order.numpy()


def q4_1_model_class(base: type, source: Q4_1Source, embeddings: str = "f16") -> type:
    """`base` (llama.cpp's model class) writing `source`'s Q4_1 rows for the quantized linears, and the token
    embedding and output head in `embeddings` ("f16": as the GPTQ folder holds them; "q8_0": llama.cpp's own Q8_0,
    what its quantizer writes for them in a Q4_1 or Q4_K_M file)."""
    import gguf
    from conversion import LazyTorchTensor

    float_heads = (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT)

    class Q4_1Model(base):
        model_arch = base.model_arch  # llama.cpp's TextModel requires every subclass to name it

        def dequant_model(self):
            raw = {}
            for name in source.names:  # the converter's own name for each linear (its filter_tensors)
                item = type(self).filter_tensors((f"{name}.qweight", None))
                if item is not None:
                    raw[item[0].removesuffix(".qweight")] = name
            self.q4_1_raw_names, tensors = {}, {}
            for key, gen in self.model_tensors.items():  # in place, so the tensor order stays the converter's
                module, _, suffix = key.rpartition(".")
                if module not in raw or suffix not in GPTQ_SUFFIXES:
                    tensors[key] = gen
                elif suffix == "qweight":
                    shape = source.shape(raw[module])
                    tensors[f"{module}.weight"] = lambda shape=shape: LazyTorchTensor.meta_with_dtype_and_shape(
                        torch.float16, shape)
                    self.q4_1_raw_names[f"{module}.weight"] = raw[module]
            self.model_tensors = tensors
            super().dequant_model()

        def modify_tensors(self, data_torch, name, bid):
            raw = self.q4_1_raw_names.get(name)
            if raw is None:
                table = self.chunked_table(data_torch, name, bid)
                if table is None:
                    yield from super().modify_tensors(data_torch, name, bid)
                else:
                    yield table
                return
            out, n_in = source.shape(raw)
            rows = torch.arange(out, dtype=torch.float32)[:, None].expand(out, n_in)
            for new_name, moved in super().modify_tensors(rows, name, bid):
                # our own probe handed back: nothing moved (it cannot have been changed in place: torch refuses
                # in-place writes to an expanded tensor), so no weight-sized comparison is needed
                order = None if moved is rows else row_order(moved, out, n_in, name)
                entry = (raw, order)
                meta = gguf.LazyNumpyTensor.meta_with_dtype_and_shape(np.uint8, (out if order is None else len(order),
                                                                                  n_in // 32 * 20))
                source.queued.append(entry)
                lazy = gguf.LazyNumpyTensor(meta=meta, func=lambda entry=entry: source.blocks(entry))
                self.gguf_writer.add_tensor(new_name, lazy, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

        def chunked_table(self, data_torch, name, bid):
            """(GGUF name, gguf.LazyChunkedTensor) for a token embedding or output head the converter passes on
            unchanged: written (and quantized, for q8_0) a few MB of rows at a time straight from the folder, where
            the converter would read it whole (2.1 GB at 70B). None for anything else: the converter's own path."""
            shape = tuple(data_torch.shape)
            try:
                new_name = self.map_tensor_name(name)
            except ValueError:
                return None
            if len(shape) != 2 or not any(self.match_model_tensor_name(new_name, key, bid) for key in float_heads):
                return None
            chunks = source.table_chunks(name, shape)
            if chunks is None:
                return None
            rows = torch.arange(shape[0], dtype=torch.float32)[:, None].expand(*shape)
            handed = list(super().modify_tensors(rows, name, bid))  # the probe: unchanged only if handed back
            if len(handed) != 1 or handed[0][1] is not rows:
                return None
            loaders, dtype = chunks
            return handed[0][0], gguf.LazyChunkedTensor(loaders, shape=shape, dtype=dtype)

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            if embeddings == "q8_0" and n_dims >= 2 and any(self.match_model_tensor_name(new_name, key, bid)
                                                             for key in float_heads):
                return gguf.GGMLQuantizationType.Q8_0  # quantized by the converter's own Q8_0 (ggml's, bit-exact)
            return super().tensor_force_quant(name, new_name, bid, n_dims)

        def prepare_tensors(self):
            super().prepare_tensors()
            self.ftype = gguf.LlamaFileType.MOSTLY_Q4_1  # general.file_type: what the bulk of the file is

    return Q4_1Model


def convert(src: Path, staged: Path, out: Path, merge: dict | None, embeddings: str = "f16") -> dict:
    """Write `out` from the GPTQ folder `src` (child process only: needs llama.cpp's gguf-py); returns a summary.
    The converter reads `staged` (links to the checked files of `src`); our own reader reads `src`."""
    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(staged, False)
    architecture = get_model_architecture(hparams, ModelType.TEXT)
    try:
        base = get_model_class(architecture)
    except NotImplementedError:
        raise ValueError(f"export gguf: llama.cpp's converter ({CONVERTER_NAME}) does not know {architecture}; "
                         "export this model as awq or compressed-tensors instead.") from None
    source = Q4_1Source(src, merge)
    try:
        with torch.inference_mode():
            model = q4_1_model_class(base, source, embeddings)(staged, gguf.LlamaFileType.GUESSED, out)
            model.write()
    finally:
        source.close()
    missing = sorted(set(source.names) - set(source.terms))
    if missing:
        raise RuntimeError(f"export gguf: the converter never wrote {missing[:3]}; the output is incomplete.")
    # from the writer's own record of what it wrote (reading the file back parses the whole vocabulary: seconds)
    types = Counter(info.dtype.name for shard in model.gguf_writer.tensors for info in shard.values())
    summary = {"format": "gguf", "type": "Q4_1", "layers": len(source.terms), "tensor_types": dict(types),
               "bytes": out.stat().st_size, "converter": CONVERTER_NAME,
               "max_m_rounding_error": max(t["max_m_rounding_error"] for t in source.terms.values())}
    if merge:
        summary["merge_report"] = merge_report(source, merge)
    return summary


def merge_report(source: Q4_1Source, merge: dict) -> dict:
    layers = {}
    for name in sorted(source.adapters):
        t = source.terms[name]
        layers[name] = {"mean_abs_shift": t["mean_abs_shift"], "max_m_rounding_error": t["max_m_rounding_error"],
                        "trained_scales": source.adapters[name].scale_delta is not None
                                          or source.adapters[name].magnitude is not None}
        if t["integer_zeros"]:
            layers[name]["integer_zeros"] = t["integer_zeros"]
    n = max(len(layers), 1)
    total = {"layers": len(layers), "mean_abs_shift": sum(v["mean_abs_shift"] for v in layers.values()) / n,
             "max_m_rounding_error": max((v["max_m_rounding_error"] for v in layers.values()), default=0.0),
             "trained_scales": sum(v["trained_scales"] for v in layers.values())}
    if source.integer_shifts:
        stats = [v["integer_zeros"] for v in layers.values()]
        total.update(moved=sum(s["moved"] for s in stats), clamped=sum(s["clamped"] for s in stats),
                     max_rounding_error=max((s["max_rounding_error"] for s in stats), default=0.0))
    if not source.integer_shifts:
        shifts = "float (real-valued, not rounded)"
    elif merge["adapter_strategy"] == "exact":
        shifts = "integer (as the exact adapter trained)"
    else:
        shifts = "integer (rounded to nearest, as asked)"
    return {**merge, "format": "gguf", "type": "Q4_1", "shifts": shifts, "bits": source.bits, "total": total,
            "layers": layers}


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING if request["progress"] else logging.ERROR)
    try:
        answer = {"summary": convert(Path(request["src"]), Path(request["staged"]), Path(request["out"]),
                                     request["merge"], request.get("embeddings", "f16"))}
    except (ValueError, NotImplementedError) as e:  # ours, or the converter's (an unknown tokenizer...)
        message = str(e) if str(e).startswith("export gguf") else f"export gguf: llama.cpp's converter refused: {e}"
        answer = {"error": type(e).__name__, "message": message}
    except OSError as e:  # a full disk, a file size limit: the parent raises it again, for the atomic writer
        answer = {"error": "OSError", "errno": e.errno, "message": e.strerror or str(e), "file": e.filename}
    Path(request["result"]).write_text(json.dumps(answer))
    return 0 if "summary" in answer else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
