"""Recipe-driven QA-LoRA training on a GPTQ base with transformers' Trainer, resumable.

With `save_steps`, Trainer's own checkpoints (adapter with its trained scales, optimizer, scheduler,
RNG states, trainer state) go to `OUT_DIR.checkpoints` beside the adapter folder; `resume` continues
from the newest complete one (a checkpoint killed while being saved lacks `trainer_state.json`, which
Trainer writes last, and is removed). The adapter folder itself is written at the end, atomically
(`atomic.atomic_output_dir`), and the checkpoints are then removed: their folder exists only while a
run is unfinished.

Several processes (`torchrun --nproc_per_node N -m peft_qalora.cli train ...` or `accelerate launch
--num_processes N ...`): Trainer wraps the model in DDP (gloo on a CPU, NCCL on GPUs); `batch_size` is
the GLOBAL batch, split evenly over the processes; the frozen quantized buffers are not broadcast
(every process loads the same files) and the kernel's caches stay per process; only rank 0 writes the
adapter and removes the checkpoints, and only rank 0 reports (`echo`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..names import DEFAULT_LORA_ALPHA, DEFAULT_MERGE_STRATEGY
from ..utils.atomic import atomic_output_dir, check_output_dir, pause_point
from ..tuners.qalora.config import QALoraConfig
from .data import lm_dataset
from ..base.load import load_gptq_model
from ..base.prepare import prepare_model_for_training


ADAPTER_OPTIONS = ("method", "r", "lora_alpha", "lora_dropout", "merge_strategy", "train_scales", "use_dora")
"""Asking for any of these asks for an adapter: with none, `TrainSettings.scales_only` defaults to True."""


@dataclass
class TrainSettings:
    """How to train; every field is also a CLI flag and a YAML key."""

    method: str = "qalora"
    """'qalora' (QALoraConfig) or 'vera' (QAVeraConfig: r is the shared projections' rank, lora_alpha unused,
    lora_dropout is its vera_dropout, train_scales off unless set)."""
    steps: int = 60
    """Optimizer steps."""
    batch_size: int = 4
    """Sequences per optimizer step, over all processes (the global batch; each of N processes takes
    batch_size / N, which must be whole). Times gradient_accumulation_steps if given in `extra`."""
    learning_rate: float = 2e-4
    """AdamW learning rate (the QA-LoRA paper's public script default)."""
    scale_lr_ratio: float = 10.0
    """How much faster the trained scale factors move than A and B (QALoraConfig.scale_lr_ratio)."""
    r: int = 16
    """Adapter rank."""
    lora_alpha: float = DEFAULT_LORA_ALPHA
    """Scaling numerator: the update is scaled by lora_alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    merge_strategy: str = DEFAULT_MERGE_STRATEGY
    """'exact' (training sees the integer merge; the default), 'nearest' or 'calibrated'."""
    train_scales: bool | None = None
    """With merge_strategy 'exact', also train the fp16 scales (None: on for exact, off with use_dora)."""
    scales_only: bool | None = None
    """Train only the fp16 scale factors, no A and B (PEQA on a GPTQ base). None (the default, as the CLI's):
    True unless an adapter option (ADAPTER_OPTIONS) differs from its default; by the quality table the scales
    alone are as good as adapter + scales, and 44% cheaper."""
    use_dora: bool = False
    """QA-DoRA: also train a magnitude per output column, merged exactly into the fp16 scales."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    bf16: bool = False
    """Train in bfloat16 (CPU autocast)."""
    seed: int = 0
    """Random seed."""
    save_steps: int = 0
    """Save a resumable checkpoint every this many steps to OUT_DIR.checkpoints (0: none)."""
    eval_steps: int | None = None
    """With validation data, its loss every this many steps and at the end (None: about ten times a run)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in OUT_DIR.checkpoints (from step 0 if there is none)."""
    shard_optimizer: bool = False
    """Under a launcher, shard the adapter, its gradients and AdamW state over the processes (FSDP2)."""
    extra: dict = field(default_factory=dict)
    """Other transformers.TrainingArguments, passed through (they override the ones set here)."""

    def __post_init__(self):
        if self.scales_only is None:
            defaults = {f.name: f.default for f in fields(self) if f.name in ADAPTER_OPTIONS}
            self.scales_only = all(getattr(self, name) == default for name, default in defaults.items())
        if self.method not in ("qalora", "vera") or self.method == "vera" and (self.scales_only or self.use_dora):
            raise ValueError(f"TrainSettings: method={self.method!r} (scales_only={self.scales_only}, use_dora="
                             f"{self.use_dora}); expected 'qalora', or 'vera' without scales_only and use_dora.")
        if self.save_steps < 0:
            raise ValueError(f"TrainSettings: save_steps={self.save_steps}; use a positive step count, or 0 for none.")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"TrainSettings: eval_steps={self.eval_steps}; use a positive step count, or leave unset.")
        if self.shard_optimizer and (self.save_steps or self.resume):
            raise ValueError("TrainSettings: shard_optimizer cannot be combined with save_steps / resume yet (Trainer "
                             "would checkpoint only one process's shard); drop one of them.")

    def qalora_config(self) -> QALoraConfig:
        if self.method == "vera":
            from ..tuners.qavera.config import QAVeraConfig

            return QAVeraConfig(r=self.r, vera_dropout=self.lora_dropout, target_modules=self.target_modules,
                                merge_strategy=self.merge_strategy, train_scales=bool(self.train_scales),
                                scale_lr_ratio=self.scale_lr_ratio)
        return QALoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=self.target_modules, merge_strategy=self.merge_strategy,
                            train_scales=self.train_scales, scale_lr_ratio=self.scale_lr_ratio,
                            scales_only=self.scales_only, use_dora=self.use_dora)


CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                    "trainer_state.json")
"""Files of a complete checkpoint, besides the RNG states: `rng_state.pth` from one process,
`rng_state_<rank>.pth` from each of several."""


def checkpoints_dir(out_dir) -> Path:
    """Where `train_adapter` keeps resumable checkpoints: OUT_DIR.checkpoints, beside the adapter folder."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.checkpoints")


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` in `folder`; incomplete ones (a kill while saving) are removed."""
    complete = []
    for path in sorted(Path(folder).glob("checkpoint-*")):
        if _is_complete(path):
            complete.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return max(complete, key=lambda p: int(p.name.rpartition("-")[2]), default=None)


def _is_complete(path: Path) -> bool:
    if not path.name.rpartition("-")[2].isdigit() or not all((path / f).is_file() for f in CHECKPOINT_FILES):
        return False
    if not (path / "rng_state.pth").is_file() and not any(path.glob("rng_state_*.pth")):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == int(path.name.rpartition("-")[2])


def _resume_point(checkpoints: Path, resume: bool) -> Path | None:
    if not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        return None
    if not resume:
        raise FileExistsError(
            f"train: {checkpoints} holds the checkpoints of an unfinished run; pass --resume (resume: true) to "
            "continue it, or remove that folder to start over."
        )
    return last_checkpoint(checkpoints)


def trainer_arguments(settings: TrainSettings, checkpoints: Path, validate: bool = False) -> TrainingArguments:
    """Trainer's arguments for `settings`, checkpoints (if any) under `checkpoints`; `settings.extra` wins.
    `validate`: Trainer evaluates the eval dataset every `settings.eval_steps` steps.

    `settings.batch_size` is the global batch: each process gets `batch_size / world_size` (unless
    `extra` sets `per_device_train_batch_size` itself). Under DDP every adapter parameter is used in
    every step (so no search for unused ones), and the frozen GPTQ buffers are not broadcast from
    rank 0 at each forward: every process loaded them from the same files, and a broadcast would
    copy the whole quantized model each step and invalidate the kernel's per-layer caches.

    The device is Trainer's own choice (a CUDA GPU when torch sees one, one per process under a launcher);
    `use_cpu` is forced only where there is no CUDA GPU (keeping Trainer off other accelerators such as MPS,
    whose missing float64 DoRA's norms need); `extra: {use_cpu: true}` trains on the CPU anyway.
    """
    saving = dict(save_strategy="steps", save_steps=settings.save_steps, save_total_limit=2) \
        if settings.save_steps else dict(save_strategy="no")
    if validate:
        saving.update(eval_strategy="steps", eval_steps=settings.eval_steps or max(1, settings.steps // 10),
                      per_device_eval_batch_size=settings.batch_size)
    kwargs = dict(
        output_dir=str(checkpoints), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10,
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=settings.seed, bf16=settings.bf16,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False, **saving,
    )
    args = TrainingArguments(**{**kwargs, **settings.extra})
    _refuse_lone_process(args.world_size)
    if "per_device_train_batch_size" not in settings.extra:
        world = args.world_size
        if settings.batch_size % world:
            raise ValueError(
                f"train: batch_size {settings.batch_size} is the global batch (sequences per optimizer step over all "
                f"processes) and must split evenly over the {world} processes; use a multiple of {world}."
            )
        args.per_device_train_batch_size = settings.batch_size // world
    return args


def _refuse_lone_process(world_size: int) -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process (its multi-CPU mode expects `mpirun`
    to start the others) and sets MASTER_ADDR; refuse that rather than train on 1/N of what was asked."""
    env = os.environ
    mpi = any(k in env for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_SIZE", "WORLD_SIZE"))
    if world_size == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and not mpi:
        raise ValueError(
            "train: `accelerate launch --cpu --num_processes N` starts a single process (accelerate's multi-CPU mode "
            "expects mpirun to start the others). Use `accelerate launch --multi_gpu --num_processes N` (it also runs "
            "on CPUs, with gloo) or `torchrun --nproc_per_node N`."
        )


def global_batch(args: TrainingArguments) -> int:
    """Sequences per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def _tensors_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a sharded DTensor counts its local shard)."""
    seen = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
    return sum(seen.values())


def replica_memory(model, optimizer=None) -> dict:
    """Bytes this process holds, measured from the tensors: frozen weights (packed codes, zeros, scales,
    float embeddings and norms), the kernel's per-layer caches, the adapter (trainable parameters), their
    gradients and the optimizer state (empty before the first step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in ids] + list(model.buffers())
    caches = []
    for module in model.modules():
        cache = getattr(module, "cache", None)
        if cache is not None and hasattr(cache, "levels"):
            caches += [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    state = [v for s in (optimizer.state.values() if optimizer is not None else ()) for v in s.values()]
    return {"weights": _tensors_bytes(frozen), "kernel_caches": _tensors_bytes(caches),
            "adapter": _tensors_bytes(trainable), "gradients": _tensors_bytes(p.grad for p in trainable),
            "optimizer_state": _tensors_bytes(state)}


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MB"


def describe_memory(memory: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {_mb(v)}" for k, v in memory.items())


class _Report(TrainerCallback):
    """Rank 0 says what each process holds after the first optimizer step (the optimizer state exists then)."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo, self.done = echo, False

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.done and state.is_world_process_zero and model is not None:
            self.done = True
            self.echo(f"per process after step {state.global_step}: "
                      f"{describe_memory(replica_memory(model, optimizer))}")


class _Validation(TrainerCallback):
    """Evaluates after the last step too (eval_steps need not divide the steps); rank 0 reports each loss."""

    def __init__(self, echo: Callable[[str], None] | None):
        self.echo = echo

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.echo and state.is_world_process_zero:
            self.echo(f"step {state.global_step}: validation loss {metrics['eval_loss']:.4f}")


def validation_summary(log_history: list[dict]) -> dict:
    """The last and the best validation loss in Trainer's log (restored on resume, so earlier runs' count)."""
    losses = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    best = min(losses, key=lambda step_loss: step_loss[1], default=None)
    return {"valid_loss": losses[-1][1], "best_step": best[0], "best_valid_loss": best[1]} if best else {}


class _PausePoints(TrainerCallback):
    """`atomic.pause_point("step-N")` after each optimizer step: where a test kills a run."""

    def on_step_end(self, args, state, control, **kwargs):
        pause_point(f"step-{state.global_step}")


def train_adapter(base_dir, train_windows, out_dir, settings: TrainSettings, overwrite: bool = False,
                  echo: Callable[[str], None] | None = None, eval_dataset=None, data_collator=None) -> dict:
    """Train a QA-LoRA adapter on `train_windows` and write it to `out_dir`; returns a summary.

    `train_windows` is a `(n, seq_len)` tensor of token windows, or a `datasets.Dataset` of input_ids /
    attention_mask / labels (`instruction.instruction_dataset`, batched by `data_collator`). With an
    `eval_dataset`, its loss is reported every `settings.eval_steps` and at the end, and the summary names the
    best step (`valid_loss`, `best_step`, `best_valid_loss`).

    The folder appears complete at the end or not at all; `overwrite` replaces an existing one. With
    `settings.save_steps` the run can be killed and continued with `settings.resume` (module docstring).
    Under a launcher (torchrun, accelerate launch) every process calls this; rank 0 alone writes the
    adapter and calls `echo` (world size, per-process and global batch, measured memory per process).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, "train", inputs=(base_dir,))  # before the work, not after it
    checkpoints = checkpoints_dir(out_dir)
    resume_from = _resume_point(checkpoints, settings.resume)
    torch.manual_seed(settings.seed)
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    model = prepare_model_for_training(load_gptq_model(base_dir, dtype=dtype), settings.gradient_checkpointing)
    model = get_peft_model(model, settings.qalora_config())
    args = trainer_arguments(settings, checkpoints, eval_dataset is not None)  # starts the process group if launched
    sharded = settings.shard_optimizer and args.world_size > 1
    if sharded:
        shard_adapter(model)
        model._is_accelerate_prepared = True  # accelerate has no FSDP on CPU and would wrap it in DDP
    validation = [_Validation(echo)] if eval_dataset is not None else []
    callbacks = [_PausePoints()] + ([_Report(echo)] if echo else []) + validation
    train = lm_dataset(train_windows) if isinstance(train_windows, torch.Tensor) else train_windows
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_dataset,
                      data_collator=data_collator, callbacks=callbacks)
    rank_zero = trainer.is_world_process_zero()
    if not settings.save_steps and rank_zero:
        with contextlib.suppress(OSError):
            checkpoints.rmdir()  # Trainer makes its output folder even when it saves nothing there
    if echo and rank_zero:
        echo(f"world size {args.world_size}: batch {args.per_device_train_batch_size} per process x "
             f"{args.world_size} processes x {args.gradient_accumulation_steps} accumulation = global batch "
             f"{global_batch(args)}; per process at start: {describe_memory(replica_memory(model))}")
    start = time.perf_counter()
    with warnings.catch_warnings():  # accelerate: use forward_sync_buffers, which Trainer cannot pass; ours is right
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    trainer.accelerator.wait_for_everyone()
    state = full_state_dict(model) if sharded else None  # every process takes part in the gather
    loss = mean_over_processes(result.training_loss, args.world_size)
    check_trained(model, loss)  # every process: the same loss, so all refuse together
    if rank_zero:  # one writer: ranks racing into one atomic publish would all but one fail
        with atomic_output_dir(out_dir, overwrite, "train") as tmp:
            model.save_pretrained(tmp, **({"state_dict": state} if sharded else {}))
        shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # every process returns once the adapter exists
    trainable, total = model.get_nb_trainable_parameters()
    first = int(resume_from.name.rpartition("-")[2]) if resume_from else 0
    return {"seconds": seconds, "seconds_per_step": seconds / max(settings.steps - first, 1),
            "train_loss": loss, "trainable_parameters": trainable, "adapter_dir": str(out_dir),
            "resumed_from_step": first, "world_size": args.world_size,
            "batch_per_process": args.per_device_train_batch_size, "global_batch": global_batch(args),
            "rank": args.process_index, **validation_summary(trainer.state.log_history), "model": model}


def check_trained(model: torch.nn.Module, loss: float) -> None:
    """Refuse to publish an adapter that is not finite: a NaN loss or parameter is a broken run, not a model."""
    broken = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if broken or not math.isfinite(loss):
        where = f"{len(broken)} adapter tensors (e.g. {broken[0]}) hold NaN or Inf" if broken else f"the loss is {loss}"
        raise ValueError(
            f"train: after training, {where}; nothing was written. Check the base's config.json (rms_norm_eps, "
            "rope_theta and similar must be finite and positive), the data, and lower --lr.")


def mean_over_processes(value: float, world_size: int) -> float:
    """Trainer's `training_loss` averaged over the processes. Trainer gathers the loss only at its logging steps and
    adds each process's own loss for the steps after the last one (a run shorter than `logging_steps` reports rank
    0's half of the batch); a mean over processes fixes that part and leaves the gathered part as it is."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return value
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total) / world_size


# ------------------------------------------------------------------ sharded adapter state (FSDP2)


def shard_adapter(model: torch.nn.Module) -> int:
    """Shard the adapter's parameters, and so its gradients and optimizer state, over the processes of
    the default process group with FSDP2 `fully_shard`, one call per QALoraLinear; returns how many.

    Only A, B and the trained scales are sharded (dim 0, DTensor `Shard(0)`): each QALoraLinear's frozen base
    layer has its parameters ignored and GPTQ's packed codes, zeros, scales and g_idx are buffers, which
    fully_shard never shards; embeddings, norms and the head are outside the sharded modules. All of them
    stay whole on every process. Gradients are reduce-scattered (averaged over the processes, as DDP's
    all-reduce) in backward; an optimizer built after this holds state for its process's shard only.
    Call with `torch.distributed` initialised and the model on its device; the model must then not be
    wrapped in DDP (`model._is_accelerate_prepared = True` makes accelerate leave it as it is).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..tuners.qalora.layer import QALoraLinear

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_adapter: torch.distributed is not initialised; launch with torchrun or accelerate.")
    layers = [m for m in model.modules() if isinstance(m, QALoraLinear)]
    device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=set(layer.base_layer.parameters()) or None)
    return len(layers)


def full_state_dict(model: torch.nn.Module) -> dict:
    """`model.state_dict()` with every sharded tensor gathered whole: a collective, so every process must call
    it, in the same order; rank 0 then saves with `model.save_pretrained(dir, state_dict=...)`."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
