"""`lmtune quickstart`: the whole road on the embedded model, in one command.

fetch SmolLM2-135M-Instruct -> make identity data (+ general replay data) -> LoRA fine-tune ->
ask the tuned model identity and ordinary questions it never saw in training.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# Identity questions in phrasings the training-data generator never uses (kept apart on purpose:
# they measure whether the identity generalises rather than was memorised).
HELDOUT_IDENTITY_QUESTIONS = [
    "Hey, what should I call you?",
    "Could you tell me a bit about who you are?",
    "Which assistant am I talking to right now?",
    "Which team is behind you, and what is your name?",
    "你叫什么名字呀？",
    "能介绍一下你是谁吗？",
    "方便说说你的来历吗？",
]

# Ordinary questions (not identity); the tuned model should answer them, not recite its name.
GENERAL_QUESTIONS = [
    "What is the capital of Italy?",
    "What is 3 plus 4?",
    "How do you say 'thank you' in French?",
]


def ask_all(model_dir: str, questions: list[str], max_new_tokens: int = 96) -> list[dict]:
    """Greedy answers from a trained folder, through its saved template and system prompt."""
    import json

    import torch

    from lmtune.data.templates import get_template
    from lmtune.models.generation import greedy_reply
    from lmtune.models.loader import load_model, load_tokenizer

    meta = json.loads((Path(model_dir) / "lmtune.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(model_dir)
    template = get_template(meta.get("prompt_template") or "auto", tokenizer)
    model = load_model(model_dir, dtype="float32").eval()
    out = []
    for q in questions:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text, stopped = greedy_reply(model, tokenizer, template, q, meta.get("system"), max_new_tokens)
        out.append({"question": q, "answer": text, "stopped": stopped})
    return out


def run_quickstart(name: str, author: str = "lmtune", work_dir: str = "work_dirs/quickstart",
                   max_steps: int | None = None) -> dict:
    from lmtune.config import load_config
    from lmtune.data.tools import write_self_cognition
    from lmtune.models.loader import resolve_model_path
    from lmtune.train.loop import run_training

    t0 = time.time()
    work = Path(work_dir)
    print("[lmtune] 1/4 preparing the embedded model…", file=sys.stderr)
    resolve_model_path("smollm2-135m-instruct")
    t_model = time.time() - t0

    print(f"[lmtune] 2/4 making identity data for {name!r} (by {author!r})…", file=sys.stderr)
    data = work / "data" / "self_cognition.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_self_cognition(str(data), name=name, author=author, n=200, seed=0, overwrite=True)  # its own file

    print("[lmtune] 3/4 fine-tuning (LoRA)…", file=sys.stderr)
    # The built-in config, with its identity-data entry pointed at the file just made (the
    # replay entry stays as the config has it).
    base = load_config("smollm2_135m_lora_self_cognition")
    datasets = [dict(e, path=str(data)) if e["path"].endswith("self_cognition.jsonl") else e for e in base.datasets]
    overrides = {"datasets": datasets}
    if max_steps:
        overrides["max_steps"] = max_steps
    cfg = load_config("smollm2_135m_lora_self_cognition", overrides)
    t1 = time.time()
    out = run_training(cfg, work)
    t_train = time.time() - t1

    print("[lmtune] 4/4 asking the tuned model questions it never saw in training…", file=sys.stderr)
    answers = ask_all(str(out), HELDOUT_IDENTITY_QUESTIONS + GENERAL_QUESTIONS)
    print()
    for a in answers:
        print(f"Q: {a['question']}\nA: {a['answer']}\n")
    total = time.time() - t0
    print(f"[lmtune] done in {total:.0f} s (model {t_model:.0f} s, training {t_train:.0f} s). "
          f"Talk to it:  lmtune chat {out}", file=sys.stderr)
    return {"hf": str(out), "answers": answers, "seconds": total, "train_seconds": t_train}
