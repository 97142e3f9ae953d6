"""One optimizer step of a QA-LoRA adapter (exact, trained scales): one process, DDP, or FSDP2 `fully_shard`.

    python tests/helpers/fsdp_probe.py BASE OUT_DIR single                           # one process, whole batch
    torchrun --nproc_per_node 2 tests/helpers/fsdp_probe.py BASE OUT_DIR ddp|fsdp    # the batch split over the processes

For each optimizer (SGD at lr 1, AdamW at lr 1e-3) it starts from the same seeded adapter, takes one step on
the same 4 windows and writes, from rank 0, OUT_DIR/<optim>.safetensors (full tensors) and the start
OUT_DIR/start.safetensors, and from every process OUT_DIR/report-<optim>-rank<r>.json: the bytes it holds
(train.replica_memory, measured) and the tensor types.

FSDP2 is applied per QALoraLinear with the base layer's parameters ignored: only the adapter (A, B, the
trained scales) is sharded, so its gradients and AdamW state are too; the frozen GPTQ buffers (qweight,
qzeros, scales, g_idx) are buffers, which fully_shard never shards, and every other frozen weight is outside
the sharded modules: all stay replicated.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peft_qalora  # noqa: E402,F401
from peft_qalora.tuners.qalora.layer import QALoraLinear  # noqa: E402
from peft_qalora.base.load import load_gptq_model  # noqa: E402
from peft_qalora.training.recipe import TrainSettings, full_state_dict, replica_memory, shard_adapter  # noqa: E402
from peft_qalora.base.prepare import prepare_model_for_training  # noqa: E402

OPTIMIZERS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1.0),
              "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0)}


def one_step(base: str, mode: str, optim: str, rank: int, world: int):
    torch.manual_seed(0)
    model = get_peft_model(prepare_model_for_training(load_gptq_model(base, dtype=torch.float32), False),
                           TrainSettings(r=4, merge_strategy="exact").qalora_config())
    gen = torch.Generator().manual_seed(3)  # B starts at zero: a seeded non-trivial start gives A, B, scales gradients
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    trainable = [p for p in model.parameters() if p.requires_grad]
    net = model
    if mode == "fsdp":
        assert shard_adapter(model) == sum(isinstance(m, QALoraLinear) for m in model.modules()) > 0
        trainable = [p for p in model.parameters() if p.requires_grad]  # fully_shard swaps in DTensor parameters
    elif mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = OPTIMIZERS[optim](trainable)
    model.train()
    loss = net(input_ids=ids, labels=ids).loss  # equal-length windows: the mean of half-batch means is the mean
    loss.backward()
    opt.step()
    frozen = [t for t in list(model.buffers()) + [p for p in model.parameters() if not p.requires_grad]]
    report = {"mode": mode, "optim": optim, "rank": rank, "world": world, **replica_memory(model, opt),
              "adapter_types": sorted({type(p).__name__ for p in trainable}),
              "placements": sorted({str(getattr(p, "placements", None)) for p in trainable}),
              "frozen_dtensors": sum(hasattr(t, "to_local") for t in frozen)}
    full = full_state_dict(model)  # every rank: a collective
    state = {n: full[n].detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    return report, state, start


def main() -> None:
    base, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    rank, world = 0, 1
    if mode != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    for optim in OPTIMIZERS:
        report, state, start = one_step(base, mode, optim, rank, world)
        (out / f"report-{optim}-rank{rank}.json").write_text(json.dumps(report))
        if rank == 0:
            save_file(state, out / f"{optim}.safetensors")
            save_file(start, out / "start.safetensors")
    if mode != "single":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
