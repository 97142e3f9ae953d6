"""Reading adapter folders (ours: QA-LoRA and QA-VeRA, or peft's `LoraConfig(use_qalora=True)`) as per-layer updates.

All become `LayerAdapter`: A (r, n_pool_groups) and B (out, r) in the group-SUM convention, the
scaling, and the pooling group size in inputs. peft's own QA-LoRA pools with `mean * n_chunks`
over contiguous chunks of `qalora_group_size`, i.e. `sum * n_chunks / qalora_group_size`: importing
it multiplies A by that factor, and it merges only when its chunks are whole quantization groups. A QA-VeRA adapter becomes `A = d * A_shared`,
`B = b * B_shared` at scaling 1, the shared projections read from the file or regenerated from its PRNG key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import __version__
from ..gptq.header import read_header
from ..gptq.inputs import check_input_folder, read_json, shown
from ..names import MERGE_STRATEGIES, QALORA, QAVERA
from .projections import shared_projections, vera_factors
from .zeros import group_delta


@dataclass
class LayerAdapter:
    """One layer's adapter in our convention."""

    A: torch.Tensor | None  # (r, n_pool_groups); None for a scales-only adapter
    B: torch.Tensor | None  # (out, r)
    scaling: float
    pool_group_size: int | None  # inputs per pooling group; None = the layer's quantization group size
    contiguous_chunks: bool = False  # peft's pooling: contiguous input chunks, blind to g_idx
    scale_delta: torch.Tensor | None = None  # (n_quant_groups, out) trained c in s' = s * (1 + c)
    magnitude: torch.Tensor | None = None  # (out,) QA-DoRA's e in m = (1 + e) * ||W|| per column
    shared_columns: bool = False  # QA-VeRA: A spans the widest layer's pooled inputs; pool_factor keeps this layer's

    @property
    def out_features(self) -> int:
        return self.B.shape[0] if self.B is not None else self.scale_delta.shape[1]

    def delta(self, in_features: int, n_quant_groups: int, g_idx: torch.Tensor, name: str) -> torch.Tensor:
        """(n_quant_groups, out) weight update of every quantization group; raises if it cannot merge."""
        factor = self.pool_factor(in_features, n_quant_groups, g_idx, name)
        if self.A is None:
            return torch.zeros(n_quant_groups, self.out_features)
        delta = group_delta(self.A, self.B, self.scaling, factor)  # (n_quant_groups, out)
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(f"merge: the adapter of {shown(name)} gives an update that is not finite (its A and B are "
                             "finite but their product overflows); the adapter is broken: train it again.")
        return delta

    def pool_factor(self, in_features: int, n_quant_groups: int, g_idx: torch.Tensor, name: str) -> int:
        """Quantization groups per pooling group; raises when the update is not constant per group."""
        quant_gs = in_features // n_quant_groups
        pool_gs = self.pool_group_size or quant_gs
        if self.A is None:
            return 1
        if self.shared_columns and in_features % pool_gs == 0 and in_features // pool_gs <= self.A.shape[1]:
            self.A, self.shared_columns = self.A[:, : in_features // pool_gs], False  # (r, this layer's groups)
        if pool_gs % quant_gs or self.A.shape[1] * pool_gs != in_features:
            raise ValueError(
                f"merge: the adapter of {name} pools groups of {pool_gs} inputs ({self.A.shape[1]} groups) but the "
                f"base layer has {in_features} inputs quantized in groups of {quant_gs}: the update is not constant "
                "per quantization group, so it cannot become zero points. Merge it into the base it was trained on."
            )
        if self.contiguous_chunks and not torch.equal(g_idx.long(), torch.arange(in_features) // quant_gs):
            raise ValueError(
                f"merge: {name} is act-order (scattered groups) but peft's use_qalora pooled contiguous chunks, which "
                "straddle its quantization groups; this adapter cannot merge. Train with peft_qalora.QALoraConfig, "
                "which pools by g_idx."
            )
        return pool_gs // quant_gs


ADAPTER_DTYPES = ("F32", "F16", "BF16")  # what peft saves; float8 and integers cannot hold an update faithfully
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
# Every key a QALoraConfig writes (PeftConfig's and ours) and the JSON types each may hold; a test keeps this equal
# to the dataclass. Kept here, not derived, so the file merge never imports peft.
QALORA_CONFIG_TYPES = {
    "task_type": (str, None), "peft_type": (str,), "auto_mapping": (dict, None), "peft_version": (str, None),
    "base_model_name_or_path": (str, None), "revision": (str, None), "inference_mode": (bool,), "r": (int,),
    "lora_alpha": (int, float), "lora_dropout": (int, float), "target_modules": (list, str, None),
    "exclude_modules": (list, str, None), "group_size": (int, None), "use_rslora": (bool,),
    "init_lora_weights": (bool, str), "merge_strategy": (str,), "train_scales": (bool, None),
    "scale_lr_ratio": (int, float), "scales_only": (bool,), "use_dora": (bool,), "fan_in_fan_out": (bool,), "bias": (str,), "modules_to_save": (list, None),
    "layers_to_transform": (list, int, None), "layers_pattern": (list, str, None), "base_quantization": (dict, None),
}
QAVERA_CONFIG_TYPES = {
    "task_type": (str, None), "peft_type": (str,), "auto_mapping": (dict, None), "peft_version": (str, None),
    "base_model_name_or_path": (str, None), "revision": (str, None), "inference_mode": (bool,), "r": (int,),
    "target_modules": (list, str, None), "exclude_modules": (list, str, None), "projection_prng_key": (int,),
    "save_projection": (bool,), "vera_dropout": (int, float), "d_initial": (int, float), "init_weights": (bool,),
    "group_size": (int, None), "merge_strategy": (str,), "train_scales": (bool,), "scale_lr_ratio": (int, float),
    "fan_in_fan_out": (bool,), "bias": (str,), "modules_to_save": (list, None), "layers_to_transform": (list, int, None),
    "layers_pattern": (list, str, None), "base_quantization": (dict, None), "projection_shape": (list, None),
}
# The keys of peft's LoraConfig this module reads (other keys are peft's to check).
LORA_CONFIG_TYPES = {"r": (int,), "lora_alpha": (int, float), "use_rslora": (bool,), "use_qalora": (bool,),
                     "qalora_group_size": (int,), "use_dora": (bool,), "lora_bias": (bool,)}
SAVE_AGAIN = "Save the adapter again (or download it again)"
TENSOR_NAMES = {QALORA: ("qalora_A", "qalora_B", "qalora_scale", "qalora_magnitude"),
                "LORA": ("lora_A", "lora_B", None, None),
                QAVERA: ("qavera_lambda_d", "qavera_lambda_b", "qalora_scale")}
PROJECTIONS = ("base_model.qavera_A", "base_model.qavera_B")  # QA-VeRA's shared A and B, when save_projection


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, LayerAdapter]]:
    """Adapter config and per-module adapters keyed by the base model's module names; every file checked first."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder, config)
    kind = config.get("peft_type")
    if kind == QALORA:
        layers = _layers(tensors, "qalora_A", "qalora_B", config, config.get("group_size"), 1.0, False)
        ratio = float(config.get("scale_lr_ratio", 1.0))  # the file holds c / scale_lr_ratio (and e / ratio)
        for key, value in tensors.items():
            for suffix, attribute in ((".qalora_scale", "scale_delta"), (".qalora_magnitude", "magnitude")):
                if key.endswith(suffix):
                    module = _module_of(key, suffix)
                    layer = layers.setdefault(module, LayerAdapter(None, None, _scaling(config), None))
                    setattr(layer, attribute, value.float() * ratio)
        return config, layers
    if kind == QAVERA:
        return config, _vera_layers(tensors, config)
    return config, _peft_qalora_layers(tensors, config)


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, checked: a QA-LoRA adapter (ours or peft's use_qalora), known keys, right types."""
    folder = Path(folder)
    check_input_folder(folder, "adapters")  # the whole tree, before a byte of it is read
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        pickle = " (adapter_model.bin is a pickle, which peft-qalora never loads)" if (
            folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(
            f"adapters: {folder} needs {CONFIG_NAME} and {WEIGHTS_NAME} (what save_pretrained writes){pickle}."
        )
    config = read_json(config_file, "adapters", f"{CONFIG_NAME} (save the adapter again)")
    check_adapter_config(config, config_file)
    return config


def check_adapter_config(config: dict, source) -> None:
    """Refuse what we cannot read faithfully: another method, unknown keys (a newer version), wrong types."""
    kind = config.get("peft_type")
    if kind == QALORA:
        unknown = sorted(set(config) - set(QALORA_CONFIG_TYPES))
        if unknown:
            raise ValueError(
                f"adapters: {source} has keys this peft-qalora ({__version__}) does not know: {unknown} (written by a "
                "newer version?). Ignoring them could change the model; upgrade peft-qalora, or delete the keys if "
                "you know they hold their defaults."
            )
        types = QALORA_CONFIG_TYPES
    elif kind == QAVERA:
        unknown = sorted(set(config) - set(QAVERA_CONFIG_TYPES))
        if unknown:
            raise ValueError(f"adapters: {source} has keys this peft-qalora ({__version__}) does not know: {unknown} "
                             "(written by a newer version?); upgrade peft-qalora.")
        types = QAVERA_CONFIG_TYPES
    elif kind == "LORA" and config.get("use_qalora") is True:
        types = LORA_CONFIG_TYPES
        if config.get("use_dora") or config.get("lora_bias"):
            raise ValueError(f"adapters: {source} is a peft use_qalora adapter with DoRA or a LoRA bias, which cannot "
                             "merge into zero points; train it without them.")
    else:
        raise ValueError(
            f"adapters: {source} holds a {kind} adapter{' without use_qalora' if kind == 'LORA' else ''}; only QA-LoRA "
            "and QA-VeRA adapters (peft_qalora.QALoraConfig or QAVeraConfig, or peft LoraConfig(use_qalora=True)) can "
            "merge into GPTQ zero points."
        )
    for key, allowed in types.items():
        if key in config and not _json_type_ok(config[key], allowed):
            names = " or ".join("null" if t is None else t.__name__ for t in allowed)
            raise ValueError(f"adapters: {source} has {key}={config[key]!r} ({type(config[key]).__name__}); expected "
                             f"{names}. Fix the value in {CONFIG_NAME} or save the adapter again.")
    _check_config_values(config, source)


def _check_config_values(config: dict, source) -> None:
    if config["peft_type"] == QAVERA:
        _check_vera_config_values(config, source)
    r, alpha = config.get("r"), config.get("lora_alpha", 1.0)
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"adapters: {source} needs a positive integer r and a finite lora_alpha (got r={r!r}, "
                         f"lora_alpha={alpha!r}); fix {CONFIG_NAME} or save the adapter again.")
    for key in ("group_size", "qalora_group_size", "scale_lr_ratio"):
        value = config.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"adapters: {source} has {key}={value!r}; it must be positive. Fix {CONFIG_NAME}.")
    strategy = config.get("merge_strategy")
    if strategy is not None and strategy not in MERGE_STRATEGIES:
        raise ValueError(f"adapters: {source} has merge_strategy={strategy!r}; expected one of {MERGE_STRATEGIES}.")


def _check_vera_config_values(config: dict, source) -> None:
    key, shape = config.get("projection_prng_key"), config.get("projection_shape")
    if not isinstance(key, int) or not 0 <= key < 2**63:
        raise ValueError(f"adapters: {source} has projection_prng_key={key!r}; QA-VeRA needs its integer seed in "
                         f"[0, 2**63). Fix {CONFIG_NAME} or save the adapter again.")
    if shape is not None and (len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValueError(f"adapters: {source} has projection_shape={shape!r}; expected [pooled inputs, outputs], two "
                         "positive integers. Save the adapter again.")
    if shape is None and config.get("save_projection") is not True:
        raise ValueError(f"adapters: {source} stores neither the QA-VeRA projections (save_projection=false) nor "
                         "projection_shape, so they cannot be rebuilt from the key; save the adapter again.")


def read_adapter_tensors(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, its header checked before safetensors reads it, then its tensors checked."""
    weights_file = Path(folder) / WEIGHTS_NAME
    header = read_header(weights_file, SAVE_AGAIN)  # a header that lies is refused here, not deep inside safetensors
    odd = sorted(k for k, e in header.items() if e.dtype not in ADAPTER_DTYPES)
    if odd:
        raise ValueError(f"adapters: {weights_file} stores {shown(odd[0])} as {header[odd[0]].dtype}, expected a 2-D "
                         f"float tensor ({', '.join(ADAPTER_DTYPES)}, as peft saves). Save the adapter again.")
    tensors = load_file(str(weights_file))
    check_adapter_tensors(tensors, config, weights_file)
    return tensors


def check_adapter_tensors(tensors: dict[str, torch.Tensor], config: dict, source) -> None:
    """Every tensor is an A, B (or trained scale) of a complete pair, 2-D float, consistent shapes, finite."""
    if config["peft_type"] == QAVERA:
        return _check_vera_tensors(tensors, config, source)
    a_name, b_name, scale_name, magnitude_name = TENSOR_NAMES[config["peft_type"]]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        role = next((n for n in (a_name, b_name) if key.endswith(f".{n}.weight")), None)
        if role is None:
            role = next((n for n in (scale_name, magnitude_name) if n and key.endswith(f".{n}")), None)
        if role is None:
            raise ValueError(
                f"adapters: {source} holds {key}, which is not a {a_name} / {b_name} tensor (modules_to_save, DoRA, "
                "or a newer format?): a merge into GPTQ zero points would drop it. Train without it, or use a "
                "peft-qalora that knows it."
            )
        module = _module_of(key, f".{role}.weight" if role in (a_name, b_name) else f".{role}")
        parts.setdefault(module, {})[role] = value
    if not parts:
        raise ValueError(f"adapters: {source} holds no {a_name} tensors; is it a complete adapter? Save it again.")
    for module, p in sorted(parts.items()):
        _check_module_tensors(module, p, TENSOR_NAMES[config["peft_type"]], config, source)


def _check_module_tensors(module: str, p: dict, names: tuple, config: dict, source) -> None:
    a_name, b_name, scale_name, magnitude_name = names
    scales_only = config.get("scales_only") is True
    required = [scale_name] if scales_only else [a_name, b_name]
    if config.get("use_dora") is True:
        required.append(magnitude_name)
    missing = [n for n in required if n not in p]
    if missing:
        raise ValueError(f"adapters: {source} has no {module}.{missing[0]} (it has {sorted(p)}); the adapter is "
                         "incomplete: save it again.")
    extra = [n for n in p if n not in required and n != scale_name]
    if extra:
        raise ValueError(f"adapters: {source} has {module}.{extra[0]}, which its config (scales_only="
                         f"{scales_only}, use_dora={config.get('use_dora') is True}) does not use; save the adapter "
                         "again.")
    for role, value in p.items():
        dims = 1 if role == magnitude_name else 2
        if value.dim() != dims or not value.dtype.is_floating_point:
            raise ValueError(f"adapters: {source}: {module}.{role} is {value.dtype} {list(value.shape)}, expected a "
                             f"{dims}-D float tensor; save the adapter again.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"adapters: {source}: {module}.{role} holds NaN or Inf; the adapter is broken (diverged "
                             "training?): retrain it, or load an earlier checkpoint.")
    if scales_only:
        return
    A, B = p[a_name], p[b_name]
    if magnitude_name in p and p[magnitude_name].shape[0] != B.shape[0]:
        raise ValueError(f"adapters: {source}: {module}.{magnitude_name} has {p[magnitude_name].shape[0]} columns but "
                         f"{b_name} has {B.shape[0]} outputs; save the adapter again.")
    rank = config["r"] if config["peft_type"] == "QALORA" else A.shape[0]  # peft's LoRA may vary r per layer
    if A.shape[0] != rank or B.shape[1] != rank:
        raise ValueError(f"adapters: {source}: {module} has {a_name} {list(A.shape)} and {b_name} {list(B.shape)}; "
                         f"with r={rank} they must be [r, groups] and [out, r]. Save the adapter again.")
    scale = p.get(scale_name) if scale_name else None
    if scale is not None and (scale.shape[1] != B.shape[0] or scale.shape[0] % A.shape[1]):
        raise ValueError(f"adapters: {source}: {module}.{scale_name} is {list(scale.shape)} but {b_name} has "
                         f"{B.shape[0]} outputs and {a_name} {A.shape[1]} groups; save the adapter again.")


def check_loaded_adapter(model_state: dict, remapped: dict, adapter_name: str, source,
                         tensor_names: tuple = TENSOR_NAMES["QALORA"]) -> None:
    """For `PeftModel.from_pretrained`: the file's tensors are exactly the adapter's, shapes match, finite."""
    names = [f".{n}.{adapter_name}" for n in tensor_names]
    expected = {k for k in model_state if any(f"{n}." in k or k.endswith(n) for n in names)}
    # anything else would land in the base model itself (e.g. `lm_head.weight`) or nowhere; modules_to_save
    # and other per-adapter wrappers carry the adapter's name
    missing = sorted(expected - set(remapped))
    unused = sorted(k for k in remapped if k not in expected and f".{adapter_name}." not in k)
    if missing:
        raise ValueError(
            f"QALoraModel: the adapter file {source} lacks {len(missing)} of the adapter tensors this model expects "
            f"(e.g. {missing[0]}), which would keep their fresh initialisation: the file is incomplete or was saved "
            "from another base. Load it onto the GPTQ checkpoint it was trained on, or save it again."
        )
    if unused:
        raise ValueError(
            f"QALoraModel: the adapter file {source} holds {len(unused)} tensors that are not this adapter's (e.g. "
            f"{unused[0]}), which peft would load into the base model itself or drop: it was saved by another "
            "method or a newer format. Use the adapter as saved by QALoraConfig, or remove those tensors."
        )
    for key, value in remapped.items():
        if key in model_state and model_state[key].shape != value.shape:
            raise ValueError(
                f"QALoraModel: adapter tensor {key} in {source} has shape {tuple(value.shape)} but this base needs "
                f"{tuple(model_state[key].shape)}: the adapter was trained on a base with other group sizes or "
                "layer shapes. Load it onto the GPTQ checkpoint it was trained on."
            )
        if not value.dtype.is_floating_point:
            raise ValueError(f"QALoraModel: adapter tensor {key} in {source} is {value.dtype}, not a float tensor; "
                             "save the adapter again.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"QALoraModel: adapter tensor {key} in {source} holds NaN or Inf; the adapter is broken "
                             "(diverged training?): retrain it, or load an earlier checkpoint.")


def _module_of(key: str, suffix: str) -> str:
    return key.removesuffix(suffix).removeprefix("base_model.model.")


def _json_type_ok(value, allowed: tuple) -> bool:
    if value is None:
        return None in allowed
    if isinstance(value, bool):
        return bool in allowed
    return any(t is not None and t is not bool and isinstance(value, t) for t in allowed)


def _scaling(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _layers(tensors, a_name, b_name, config, pool_gs, a_factor, contiguous) -> dict[str, LayerAdapter]:
    layers = {}
    for key in tensors:
        if not key.endswith(f".{a_name}.weight"):
            continue
        module = _module_of(key, f".{a_name}.weight")
        A = tensors[key].float()
        B = tensors[key.replace(f".{a_name}.", f".{b_name}.")].float()  # both present: check_adapter_tensors
        layers[module] = LayerAdapter(A * a_factor(A) if callable(a_factor) else A * a_factor, B, _scaling(config),
                                      pool_gs, contiguous)
    return layers


def _peft_qalora_layers(tensors: dict, config: dict) -> dict[str, LayerAdapter]:
    chunk = int(config.get("qalora_group_size", 16))
    # peft: delta = scaling * B A (mean-pool * n_chunks) = scaling * B (A * n_chunks / chunk) (sum-pool)
    return _layers(tensors, "lora_A", "lora_B", config, chunk, lambda A: A.shape[1] / chunk, True)


def _check_vera_tensors(tensors: dict[str, torch.Tensor], config: dict, source) -> None:
    """QA-VeRA: per module d (r,), b (out,) and trained scales iff train_scales; the projections iff save_projection."""
    d_name, b_name, scale_name = TENSOR_NAMES["QAVERA"]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        role = next((n for n in (d_name, b_name, scale_name) if key.endswith(f".{n}")), None)
        if role is None and key not in PROJECTIONS:
            raise ValueError(f"adapters: {source} holds {key}, which is not a QA-VeRA tensor ({d_name}, {b_name}, "
                             f"{scale_name} or the projections): a merge would drop it. Save the adapter again.")
        if not value.dtype.is_floating_point or not bool(torch.isfinite(value).all()):
            raise ValueError(f"adapters: {source}: {key} is {value.dtype} or holds NaN or Inf; the adapter is broken "
                             "(diverged training?): retrain it, or load an earlier checkpoint.")
        if role is not None:
            parts.setdefault(_module_of(key, f".{role}"), {})[role] = value
    saved = [k for k in PROJECTIONS if k in tensors]
    if config.get("save_projection") is True and len(saved) < 2 or config.get("save_projection") is False and saved:
        raise ValueError(f"adapters: {source} has save_projection={config.get('save_projection')} but holds "
                         f"{saved or 'no projections'}; save the adapter again.")
    if not parts:
        raise ValueError(f"adapters: {source} holds no {d_name} tensors; is it a complete adapter? Save it again.")
    r, shape = config["r"], config.get("projection_shape")
    A, B = (tensors[k] for k in PROJECTIONS) if saved else (None, None)
    if A is not None and (A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r
                          or (shape is not None and [A.shape[1], B.shape[0]] != list(shape))):
        raise ValueError(f"adapters: {source}: the projections are A {list(A.shape)} and B {list(B.shape)}; with r={r} "
                         f"and projection_shape={shape} they must be [r, {shape and shape[0]}] and "
                         f"[{shape and shape[1]}, r]. Save the adapter again.")
    out_max = B.shape[0] if B is not None else shape[1]
    wanted = [d_name, b_name] + ([scale_name] if config.get("train_scales") is True else [])
    for module, p in sorted(parts.items()):
        if sorted(p) != sorted(wanted):
            raise ValueError(f"adapters: {source}: {module} has {sorted(p)} but its config (train_scales="
                             f"{config.get('train_scales') is True}) needs {sorted(wanted)}; save the adapter again.")
        d, b, scale = p[d_name], p[b_name], p.get(scale_name)
        if d.shape != (r,) or b.dim() != 1 or b.shape[0] > out_max or (
                scale is not None and (scale.dim() != 2 or scale.shape[1] != b.shape[0])):
            scale_shape = None if scale is None else list(scale.shape)
            raise ValueError(f"adapters: {source}: {module} has {d_name} {list(d.shape)}, {b_name} {list(b.shape)} and "
                             f"{scale_name} {scale_shape}; with r={r} they must be [r], [out <= {out_max}] and "
                             "[groups, out]. Save the adapter again.")


def _vera_layers(tensors: dict, config: dict) -> dict[str, LayerAdapter]:
    """QA-VeRA: `A = d * A_shared`, `B = b * B_shared`, scaling 1; A keeps the widest layer's columns until `pool_factor`."""
    if PROJECTIONS[0] in tensors:
        A, B = (tensors[k].float() for k in PROJECTIONS)
    else:
        A, B = shared_projections(config["projection_prng_key"], config["r"], *config["projection_shape"])
    ratio = float(config.get("scale_lr_ratio", 1.0))  # the file holds c / scale_lr_ratio
    d_name, b_name, scale_name = TENSOR_NAMES["QAVERA"]
    layers = {}
    for key in tensors:
        if key.endswith(f".{d_name}"):
            stem = key.removesuffix(d_name)
            A_eff, B_eff = vera_factors(A, B, tensors[key].float(), tensors[stem + b_name].float(), A.shape[1])
            scale = tensors.get(stem + scale_name)
            layers[_module_of(key, f".{d_name}")] = LayerAdapter(
                A_eff, B_eff, 1.0, config.get("group_size"), scale_delta=None if scale is None else scale.float() * ratio,
                shared_columns=True)
    return layers
