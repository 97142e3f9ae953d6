"""Two exact-match tasks made offline by code, and greedy answers from a GGUF file in llama.cpp.

`dates` turns a date written one of seven human ways into ISO (``March 3rd 1987`` -> ``1987-03-03``); `numbers`
writes an integer in English words (``num2words``, a benchmark extra). SmolLM2-135M-Instruct scores 0-6% on both
untrained and learns them in a few dozen steps, so a fine-tune shows in what the served model answers.
``make demo`` trains on `dates`; ``benchmarks/tasks.py`` scores every pipeline on both.

Items are split by the underlying value (a date, an integer): a held-out value is never trained on, in any format.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

TASKS = ("dates", "numbers")
SYSTEM = "You are a helpful assistant."  # short (SmolLM2's template default is 20 tokens): every token counts on a CPU
INSTRUCTIONS = {
    "dates": "Rewrite this date in ISO format (YYYY-MM-DD). Reply with the date only.",
    "numbers": "Write this number in English words. Reply with the words only.",
}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


DATE_FORMATS = (
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{d.strftime('%A')}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)} {d.year}",
)


def universe(task: str) -> list:
    """Every underlying value of a task: the days of 1950-2049, or the integers 1-9999."""
    if task == "dates":
        start = dt.date(1950, 1, 1)
        return [start + dt.timedelta(days=i) for i in range((dt.date(2049, 12, 31) - start).days + 1)]
    return list(range(1, 10000))


def render(task: str, value, rng: random.Random) -> tuple[str, str]:
    """(input, answer) for one underlying value."""
    if task == "dates":
        return rng.choice(DATE_FORMATS)(value), value.isoformat()
    from num2words import num2words

    return str(value), num2words(value)


def make_items(task: str, n_train: int, n_test: int, n_val: int, seed: int = 0) -> dict[str, list[dict]]:
    """{"test", "val", "train"} items, each {prompt (the user turn), answer, value}; the same arguments give the same
    items. Held-out values (test, val) never appear in train; train cycles through the rest."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    values = universe(task)
    rng.shuffle(values)
    splits = {"test": values[:n_test], "val": values[n_test: n_test + n_val]}
    pool = values[n_test + n_val:]
    splits["train"] = [pool[i % len(pool)] for i in range(n_train)]
    out = {}
    for name, vals in splits.items():
        items = []
        for v in vals:
            text, answer = render(task, v, rng)
            items.append({"prompt": f"{INSTRUCTIONS[task]}\n{text}", "answer": answer, "value": str(v)})
        out[name] = items
    return out


def messages(item: dict) -> list[dict]:
    """The item as a chat: system, user (instruction + input), assistant (the answer)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["prompt"]},
            {"role": "assistant", "content": item["answer"]}]


def write_jsonl(items: list[dict], path: Path) -> Path:
    """Items as `messages` rows, the format ``peft-qalora train --data`` reads."""
    Path(path).write_text("".join(json.dumps({"messages": messages(it)}) + "\n" for it in items))
    return Path(path)


def prompt_ids(tokenizer: Any, item: dict) -> list[int]:
    """Token ids of the system and user turns and the assistant's generation prompt (the chat template's)."""
    text = tokenizer.apply_chat_template(messages(item)[:2], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix every prompt shares (system turn + instruction), at least one token left each."""
    n = min(map(len, prompts)) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != prompts[0][i]), n)
    return n


def greedy_llamacpp(path: Path, prompts: list[list[int]], stop: set[int], max_new: int,
                    threads: int = 2) -> list[list[int]]:
    """Greedy continuations from a GGUF file in llama.cpp (llama-cpp-python), one prompt at a time, fed the given
    token ids (the HF tokenizer's, so both engines see the same prompt); each stops before a token in `stop` or the
    file's EOS. The prompts' shared prefix is evaluated once."""
    import llama_cpp
    import numpy as np

    n_ctx = max(map(len, prompts)) + max_new + 8
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False, seed=0)
    stop = set(stop) | {llm.token_eos()}
    n = shared_prefix(prompts)
    answers = []
    try:
        llm.reset()
        llm.eval(prompts[0][:n])  # eval() drops the KV cache past n_tokens: each prompt restarts after the prefix
        for prompt in prompts:
            llm.n_tokens = n
            llm.eval(prompt[n:])
            out = []
            for _ in range(max_new):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if token in stop:
                    break
                out.append(token)
                llm.eval([token])
            answers.append(out)
    finally:
        llm.close()
    return answers


def answers_llamacpp(path: Path, tokenizer: Any, items: list[dict], threads: int = 2) -> list[str]:
    """The GGUF model's greedy answer to each item's prompt, through the chat template, stripped."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = {t for t in (end, tokenizer.eos_token_id) if isinstance(t, int) and t >= 0}
    limit = max(len(tokenizer(it["answer"], add_special_tokens=False).input_ids) for it in items) + 3
    outs = greedy_llamacpp(path, [prompt_ids(tokenizer, it) for it in items], stop, limit, threads)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def exact_match(items: list[dict], answers: list[str]) -> float:
    return sum(a == it["answer"] for it, a in zip(items, answers)) / len(items)
