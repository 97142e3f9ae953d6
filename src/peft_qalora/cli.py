"""`peft-qalora`: quantize, train, merge, export, verify, demo. The only module that reads argv or prints."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from .names import DEFAULT_LORA_ALPHA, EXPORT_FORMATS, GGUF_EMBEDDINGS, MERGE_STRATEGIES, SUPPORTED_BITS  # imports nothing: --help needs no torch

GGUF_WIDEN_HELP = "--format gguf: store 2/3-bit codes in Q4_1 (exact, 5 bits a weight)"
GGUF_EMBEDDINGS_HELP = ("--format gguf: the token embedding and output head as f16 (as the GPTQ folder holds them; "
                        "the default) or q8_0 (what llama.cpp's quantizer writes: a smaller file, not lossless)")


def _rank_zero() -> bool:
    """False in every process but the first under a launcher (torchrun, accelerate launch set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def _say(line: str) -> None:
    """Print on rank 0 only: one copy of every report however many processes train."""
    if _rank_zero():
        print(line, flush=True)


def _interrupt_on_sigterm() -> None:
    """Turn `kill` into KeyboardInterrupt so temporary folders are cleaned up."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def cmd_quantize(args) -> None:
    from .base.quantize import QuantizeSettings, quantize_model

    _interrupt_on_sigterm()
    texts = [Path(args.calibration).read_text()] if args.calibration else None
    settings = QuantizeSettings(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act)
    summary = quantize_model(args.model_dir, args.out_dir, settings, calibration_texts=texts, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2, default=str))


def load_recipe(path: str | None) -> dict:
    """A YAML recipe: `base`, `out_dir`, `seq_len`, `text` or `data` (+ `valid`, `train_on_prompt`) and a `train:`
    mapping of TrainSettings fields."""
    if not path:
        return {}
    import yaml

    recipe = yaml.safe_load(Path(path).read_text()) or {}
    from .training.recipe import TrainSettings

    unknown = set(recipe.get("train", {})) - set(TrainSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"recipe {path}: unknown train keys {sorted(unknown)}; see peft_qalora.training.recipe.TrainSettings.")
    return recipe


def train_settings(args, recipe: dict):
    """CLI flags > YAML recipe > dataclass defaults, in one visible place."""
    from .training.recipe import ADAPTER_OPTIONS, TrainSettings

    values = dict(recipe.get("train", {}))
    flags = {"method": args.method, "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "r": args.r,
             "lora_alpha": args.lora_alpha, "merge_strategy": args.merge_strategy,
             "scale_lr_ratio": args.scale_lr_ratio, "save_steps": args.save_steps, "resume": args.resume,
             "shard_optimizer": args.shard_optimizer, "scales_only": args.scales_only, "use_dora": args.use_dora,
             "eval_steps": args.eval_steps}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.adapter:
        values["scales_only"] = False
    elif any(k in values for k in ADAPTER_OPTIONS):  # given, even at its default value: an adapter is asked for
        values.setdefault("scales_only", False)
    return TrainSettings(**values)  # with no adapter option, TrainSettings' default: the scales only


def training_data(args, recipe: dict, tokenizer, seq_len: int) -> tuple[object, dict, dict]:
    """(train data, train_adapter's data keywords, summary counts): --text, --data / --valid, or the plays."""
    from .assets import shakespeare_dir
    from .training.data import DataConfig, load_windows, token_windows

    text, data, valid = (getattr(args, k) or recipe.get(k) for k in ("text", "data", "valid"))
    if text and data or valid and not data:
        raise ValueError("train: give --data (with an optional --valid) or --text, not both; --valid needs --data "
                         "(`data:` / `valid:` / `text:` in a recipe).")
    if text:
        return token_windows(tokenizer, [Path(text).read_text()], seq_len), {}, {}
    if not data:
        return load_windows(tokenizer, shakespeare_dir(), DataConfig(seq_len=seq_len))[0], {}, {}
    from .training.instruction import load_instruction_data, pad_collator

    on_prompt = bool(args.train_on_prompt or recipe.get("train_on_prompt"))
    train, held = (load_instruction_data(f, tokenizer, seq_len, on_prompt) if f else None for f in (data, valid))
    counts = {"train_rows": train.rows, "truncated_rows": train.truncated, "dropped_rows": train.dropped}
    _say(f"data {data}: {train.rows} rows ({train.trained_tokens} trained tokens), {train.truncated} truncated to "
         f"seq_len {seq_len}, {train.dropped} dropped (nothing trained left after truncation)")
    if held:
        counts.update(valid_rows=held.rows, valid_truncated_rows=held.truncated, valid_dropped_rows=held.dropped)
    keywords = {"eval_dataset": held.dataset if held else None, "data_collator": pad_collator(tokenizer)}
    return train.dataset, keywords, counts


def cmd_train(args) -> None:
    from .base.load import load_tokenizer
    from .gptq.validate import check_checkpoint
    from .training.recipe import train_adapter
    from .utils.atomic import check_apart

    _interrupt_on_sigterm()
    recipe = load_recipe(args.config)
    base, out_dir = args.base or recipe.get("base"), args.out_dir or recipe.get("out_dir")
    if not base or not out_dir:
        raise ValueError("train: give BASE and OUT_DIR, as arguments or as `base:` and `out_dir:` in --config.")
    check_checkpoint(base)  # before any work: raises naming the file, the tensor and the fix
    check_apart(out_dir, (base, *(getattr(args, k) or recipe.get(k) for k in ("text", "data", "valid"))), "train")
    seq_len = args.seq_len or recipe.get("seq_len", 128)
    tokenizer = load_tokenizer(base, "train")
    settings = train_settings(args, recipe)
    train, keywords, counts = training_data(args, recipe, tokenizer, seq_len)  # bad rows refused before the model loads
    summary = train_adapter(base, train, out_dir, settings, overwrite=args.overwrite, echo=_say, **keywords)
    summary.pop("model")
    _say(json.dumps({**summary, **counts}, indent=2))


def _check_gguf_options(args, command: str) -> None:
    """--gguf-* options name GGUF choices: refused, not ignored, with another format."""
    if args.format != "gguf" and (args.gguf_widen or args.gguf_embeddings != "f16"):
        raise ValueError(f"{command}: --gguf-widen and --gguf-embeddings apply to --format gguf only; "
                         f"drop them for --format {args.format}.")


def cmd_merge(args) -> None:
    from .gptq.folders import ShardCopies

    _interrupt_on_sigterm()
    _check_gguf_options(args, "merge")
    if args.format == "gguf":
        return _merge_to_gguf(args)
    if args.format != "gptq":
        return _merge_and_export(args)
    with ShardCopies(args.base, args.out_dir, args.overwrite, adapter_dir=args.adapter) as copies:  # copying starts before torch loads
        from .merge.files import describe_merge, merge_into

        report = merge_into(copies, args.adapter, strategy=args.strategy,
                            zero_format=2 if args.checkpoint_format == "gptq_v2" else 1)
    print(describe_merge(report))
    print(f"wrote {args.out_dir} (report: {Path(args.out_dir) / 'merge_report.json'})")


def _merge_and_export(args) -> None:
    from .exports import describe_export, merge_and_export
    from .merge.files import describe_merge

    report, summary = merge_and_export(args.base, args.adapter, args.out_dir, args.format, strategy=args.strategy,
                                       overwrite=args.overwrite)
    print(describe_merge(report))
    print(describe_export(summary))


def _merge_to_gguf(args) -> None:
    from .exports.gguf import describe_gguf, describe_gguf_merge, merge_gguf

    if args.strategy is not None:
        raise ValueError("merge --format gguf: --strategy picks how shifts are rounded to integer zeros; GGUF stores "
                         "them unrounded. Use --shifts integer to round anyway.")
    float_shifts = {None: None, "float": True, "integer": False}[args.shifts]
    report, summary = merge_gguf(args.base, args.adapter, args.out_dir, float_shifts=float_shifts,
                                 overwrite=args.overwrite, widen=args.gguf_widen, embeddings=args.gguf_embeddings)
    print(describe_gguf_merge(report))
    print(describe_gguf(summary))


def cmd_export(args) -> None:
    from .exports import describe_export, export

    _interrupt_on_sigterm()
    _check_gguf_options(args, "export")
    options = {"widen": args.gguf_widen, "embeddings": args.gguf_embeddings} if args.format == "gguf" else {}
    print(describe_export(export(args.src, args.dest, args.format, overwrite=args.overwrite, **options)))


def cmd_export_lora(args) -> None:
    from .exports.lora import export_lora

    _interrupt_on_sigterm()
    s = export_lora(args.adapter, args.out_dir, args.base, overwrite=args.overwrite)
    print(f"wrote standard LoRA {s['out']}: {s['layers']} layers, r={s['r']}; A grew from "
          f"{s['A_parameters_before']:,} to {s['A_parameters_after']:,} parameters (B: {s['B_parameters']:,})")


def cmd_verify(args) -> None:
    from .training.data import token_windows
    from .gptq.validate import check_checkpoint
    from .base.load import load_tokenizer
    from .verify import verify_merge

    for folder in (args.out_dir, args.base):  # before any work: raises naming the file, the tensor and the fix
        check_checkpoint(folder)
    tokenizer = load_tokenizer(args.out_dir, "verify")
    text = Path(args.text).read_text() if args.text else "To be, or not to be, that is the question. " * 40
    windows = token_windows(tokenizer, [text], args.seq_len, max_windows=args.windows)
    result = verify_merge(args.out_dir, args.base, args.adapter, windows[:2], windows if args.text else None)
    print(json.dumps(result, indent=2))
    if not result["matches_in_memory"]:
        sys.exit("verify: the exported checkpoint does NOT reproduce the in-memory merged model")


def cmd_demo(args) -> None:
    from .demo import DemoSettings, run_demo

    run_demo(DemoSettings(steps=args.steps, learning_rate=args.learning_rate, n_test=args.n_test, bits=args.bits,
                          task=args.task), echo=lambda line: print(line, flush=True))


DESCRIPTION = """\
Fine-tune a GPTQ-quantized model with QA-LoRA, merge it into the quantized weights with nothing lost,
and export it for the engine you serve with. Every command runs on a CPU; none needs a GPU.

  quantize   float model folder -> GPTQ folder (GPTQModel, asymmetric, the base to train on)
  train      GPTQ folder + text or instruction JSONL -> adapter folder (peft's layout)
  merge      GPTQ folder + adapter -> merged GPTQ folder, or an AWQ / compressed-tensors folder (vLLM),
             or a GGUF file (llama.cpp)
  export     GPTQ folder -> AWQ / compressed-tensors folder (vLLM) or GGUF file (llama.cpp)
  export-lora  adapter -> plain peft LoRA folder (vLLM --enable-lora on the exported base)
  verify     merged GPTQ folder -> compared with the adapter model in transformers
  demo       fine-tune SmolLM2-135M on a task, offline; answers before and after in llama.cpp

Outputs appear whole or not at all; an output may not overwrite an input."""


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-qalora", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbose_help = "also show the libraries' logs and warnings (GPTQModel, transformers, torch)"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="float model folder -> GPTQ folder OUT_DIR (GPTQModel on the CPU; asymmetric "
                       "zeros, which QA-LoRA's merge needs)")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    q.add_argument("--group-size", type=int, default=32)
    q.add_argument("--desc-act", action="store_true", help="act-order quantization")
    q.add_argument("--calibration", help="a text file of calibration text (default: Shakespeare plays)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_quantize)
    t = sub.add_parser("train", help="train on a GPTQ base (the fp16 scales by default, or a QA-LoRA / QA-DoRA / "
                       "QA-VeRA adapter) -> adapter folder OUT_DIR (peft's layout)")
    t.add_argument("base", nargs="?", help="GPTQ checkpoint folder (or `base:` in --config)")
    t.add_argument("out_dir", nargs="?", help="adapter folder to write (or `out_dir:` in --config)")
    t.add_argument("--config", help="a YAML recipe (configs/*.yaml); flags given here override it")
    t.add_argument("--text", help="a text file to train on, cut into seq-len windows (default: Shakespeare plays)")
    t.add_argument("--data", help="a JSONL file of instruction rows: {text}, {prompt, completion} or {messages} "
                   "(docs/training-data.md); loss on completions / assistant turns only")
    t.add_argument("--valid", help="a JSONL file like --data: its loss every --eval-steps and at the end")
    t.add_argument("--train-on-prompt", action="store_true", default=None,
                   help="--data: loss on every token, prompts and user turns included")
    t.add_argument("--eval-steps", type=int, help="--valid: validation loss every N steps (default: steps / 10)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 60)")
    t.add_argument("--batch-size", type=int,
                   help="sequences per optimizer step over all processes, split evenly among them (default 4)")
    t.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    t.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    t.add_argument("--lora-r", "--r", dest="r", type=int,
                   help="adapter rank (default 16); --r is an alias that torchrun's own parser rejects")
    t.add_argument("--lora-alpha", type=float, help=f"scaling numerator (default {DEFAULT_LORA_ALPHA})")
    t.add_argument("--method", choices=("qalora", "vera"),
                   help="qalora (default) or vera: QA-VeRA, shared random projections and r + out trained numbers a layer")
    t.add_argument("--merge-strategy", choices=MERGE_STRATEGIES,
                   help="default exact: training sees the integer merge (and trains the fp16 scales)")
    t.add_argument("--scale-lr-ratio", type=float, help="trained scales move this much faster than A, B (default 10)")
    t.add_argument("--scales-only", action="store_true", default=None,
                   help="train only the fp16 scale factors, no A and B: the default unless an adapter option "
                   "(--adapter, --lora-r, --lora-alpha, --merge-strategy, --use-dora, --method) is given")
    t.add_argument("--adapter", action="store_true", default=None,
                   help="train the QA-LoRA adapter A, B (with the trained scales under the exact strategy)")
    t.add_argument("--use-dora", action="store_true", default=None,
                   help="QA-DoRA: a trained magnitude per output column, merged exactly into the fp16 scales")
    t.add_argument("--save-steps", type=int,
                   help="save a resumable checkpoint every N steps to OUT_DIR.checkpoints (default 0: none)")
    t.add_argument("--shard-optimizer", action="store_true", default=None,
                   help="under torchrun / accelerate: shard the adapter, its gradients and AdamW state over the "
                   "processes (FSDP2); the 4-bit weights stay replicated")
    t.add_argument("--resume", action="store_true", default=None,
                   help="continue a killed run from its newest complete checkpoint (from step 0 if there is none)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (at the very end)")
    t.set_defaults(func=cmd_train)
    m = sub.add_parser("merge", help="fold an adapter into a GPTQ base's zeros and scales, file to file, without "
                       "loading the model -> GPTQ folder, AWQ / compressed-tensors folder or GGUF file (--format)")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", dest="out_dir", required=True)
    m.add_argument("--strategy", choices=MERGE_STRATEGIES, default=None, help="default: the adapter's merge_strategy")
    m.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="gptq (v1, every loader) or gptq_v2 (keeps true zeros of 0; not ExLlamaV2)")
    m.add_argument("--format", choices=("gptq", *EXPORT_FORMATS), default="gptq",
                   help="write the merged model as GPTQ (default) or export it: awq / compressed-tensors "
                   "(what current vLLM serves asymmetric), gguf (a .gguf file for llama.cpp)")
    m.add_argument("--shifts", choices=("float", "integer"), default=None,
                   help="--format gguf: float = the adapter's real-valued zero shifts, unrounded (default unless the "
                   "adapter is exact); integer = rounded (default for exact adapters: what they trained with)")
    m.add_argument("--gguf-widen", action="store_true", help=GGUF_WIDEN_HELP)
    m.add_argument("--gguf-embeddings", choices=GGUF_EMBEDDINGS, default="f16", help=GGUF_EMBEDDINGS_HELP)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)
    e = sub.add_parser("export", help="GPTQ folder (merged or base) -> AWQ or compressed-tensors folder (vLLM, "
                       "transformers) or GGUF Q4_1 file (llama.cpp), exactly, file to file")
    e.add_argument("src", help="GPTQ checkpoint folder")
    e.add_argument("dest", help="folder to write (a .gguf file for --format gguf)")
    e.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="awq: 4-bit, contiguous groups (vLLM, transformers); compressed-tensors: 2/3/4/8-bit, "
                   "act-order; gguf: Q4_1 for llama.cpp, 4-bit contiguous groups of a multiple of 32")
    e.add_argument("--gguf-widen", action="store_true", help=GGUF_WIDEN_HELP)
    e.add_argument("--gguf-embeddings", choices=GGUF_EMBEDDINGS, default="f16", help=GGUF_EMBEDDINGS_HELP)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)
    el = sub.add_parser("export-lora", help="QA-LoRA adapter -> standard peft LoRA folder OUT_DIR (vLLM "
                        "--enable-lora on the base's AWQ export)")
    el.add_argument("adapter", help="QA-LoRA adapter folder (trained unconstrained: --merge-strategy nearest)")
    el.add_argument("out_dir", help="LoRA adapter folder to write")
    el.add_argument("--base", required=True, help="the GPTQ base it was trained on (for g_idx)")
    el.add_argument("--overwrite", action="store_true")
    el.set_defaults(func=cmd_export_lora)
    v = sub.add_parser("verify", help="reload a merged GPTQ folder with transformers + GPTQModel and compare it with "
                       "the adapter model (prints JSON, writes nothing)")
    v.add_argument("out_dir")
    v.add_argument("--base", required=True)
    v.add_argument("--adapter", required=True)
    v.add_argument("--text", help="evaluation text: perplexities of base, adapter and merged")
    v.add_argument("--seq-len", type=int, default=128)
    v.add_argument("--windows", type=int, default=16)
    v.set_defaults(func=cmd_verify)
    d = sub.add_parser("demo", help="SmolLM2-135M-Instruct, offline: quantize, fine-tune on a task (chat JSONL), "
                       "merge, export GGUF, and answer held-out prompts in llama.cpp before and after; works in the "
                       "cache folder ($PEFT_QALORA_CACHE or ~/.cache/peft-qalora)")
    d.add_argument("--task", choices=("dates", "numbers"), default="dates",
                   help="dates: any human date -> YYYY-MM-DD; numbers: integer -> English words (needs num2words)")
    d.add_argument("--steps", type=int, default=24)
    d.add_argument("--learning-rate", type=float, default=1e-3)
    d.add_argument("--n-test", type=int, default=40, help="held-out prompts answered before and after")
    d.add_argument("--bits", type=int, default=4)
    d.set_defaults(func=cmd_demo)
    for command in sub.choices.values():  # also after the command; SUPPRESS keeps a --verbose given before it
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return parser


# What a bad input or output path raises, from our checks or from a library reading it: one line, no traceback.
INPUT_ERRORS = (ValueError, OSError, RecursionError, OverflowError, MemoryError, UnicodeError)


def error_line(err: BaseException) -> str:
    """The one message printed for `err`: ours as written; an operating system error with its file, its cause and
    the fix; names escaped so that a file or tensor name cannot send control codes to the terminal."""
    from .gptq.inputs import shown

    if isinstance(err, OSError) and err.strerror and getattr(err, "filename", None):
        text = (f"cannot use {err.filename}: {err.strerror} (errno {err.errno}); check that the path exists, is "
                "allowed and writable where it is an output, and that its filesystem has room")
    elif isinstance(err, RecursionError):
        text = f"an input is nested too deeply to read ({err}); check the JSON files of the folders you passed"
    else:
        text = str(err) or type(err).__name__
        if not isinstance(err, INPUT_ERRORS):
            text = f"{type(err).__name__}: {text} (run with --verbose for the traceback)"
    return "\n".join(shown(line) for line in text.splitlines() or [""])


def main(argv: list[str] | None = None) -> None:
    from .utils.quiet import library_chatter

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        with library_chatter(args.verbose):
            args.func(args)
    except INPUT_ERRORS as err:
        sys.exit(f"error: {error_line(err)}")
    except Exception as err:  # a library's own error class (safetensors, pickle...): still one line, unless asked
        if args.verbose:
            raise
        sys.exit(f"error: {error_line(err)}")
    if _rank_zero():
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
