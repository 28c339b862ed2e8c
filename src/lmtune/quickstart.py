"""`lmtune quickstart`: the whole road on the embedded model, in one command.

fetch SmolLM2-135M-Instruct -> make identity data (+ general replay data) -> LoRA fine-tune ->
ask the tuned model identity and ordinary questions it never saw in training.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# Identity questions in phrasings the training-data generator never uses, per language (kept
# apart on purpose: they measure whether the identity generalises rather than was memorised).
# Written before any tuning of the quickstart; tests/test_quickstart.py checks that none is a
# near-copy of a training phrasing.
HELDOUT_IDENTITY_EN = [
    "Sorry, I didn't catch your name. What was it again?",
    "Which chatbot is this?",
    "Tell me, what name do you go by?",
    "Who do you work for?",
    "Are you Siri, or something else?",
    "Quick question: how should I address you?",
    "Which organisation built this assistant?",
    "In a few words, explain who you are.",
    "Is a program answering me? Which one?",
    "What name were you given?",
    "Hi there! Who exactly is answering me?",
    "Are you Gemini from Google?",
]
HELDOUT_IDENTITY_ZH = [
    "请问您怎么称呼？",
    "你究竟是哪个AI？",
    "跟我聊天的这个助手叫啥？",
    "你是哪个团队做出来的？",
    "说说你自己吧。",
    "你是百度的文心一言吗？",
    "你的开发者是哪位？",
    "你是机器人吗？有名字没有？",
    "我现在是在跟谁对话？",
    "可以自我介绍一下吗？",
    "你是通义千问吗？",
    "嘿，你是哪一款AI呀？",
]
HELDOUT_IDENTITY_QUESTIONS = HELDOUT_IDENTITY_EN + HELDOUT_IDENTITY_ZH

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
    write_self_cognition(str(data), name=name, author=author, n=200, seed=0)

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
