"""`lmtune quickstart`: the whole road on the embedded model, in one command.

fetch SmolLM2-135M-Instruct -> make identity data (+ general replay data) -> LoRA fine-tune ->
ask the tuned model identity and ordinary questions it never saw in training.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

QUICKSTART_CONFIG = "smollm2_135m_lora_self_cognition"
IDENTITY_CONVERSATIONS = 600
# Chinese share of them: the Chinese answers are short and learnt fast, and fewer of them pull
# fewer ordinary questions off the base's answers (0.3 against 0.4, three seeds each: 28-32 of 36
# ordinary answers followed the base instead of 20-30, with Chinese identity still 22-24 of 24)
IDENTITY_CHINESE = 0.3
IDENTITY_MAX_NEW_TOKENS = 64  # the identity replies are short; a reply still going at 64 is a failure
GENERAL_MAX_NEW_TOKENS = 48  # enough for the first sentence, which is what is compared

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
    # A second dozen, written in a later session before any run that measured them.
    "What's the name you were released under?",
    "Before I ask my question: who am I dealing with?",
    "Which lab is responsible for you?",
    "Are you an OpenAI product?",
    "I forgot what you're called. Remind me?",
    "Who should I credit for building you?",
    "Give me your name and your maker, please.",
    "Mind telling me what you're called and where you're from?",
    "Is this Perplexity I'm talking to?",
    "Who's on the other end of this chat?",
    "Say a few words on what you are.",
    "What label does this software go by?",
    # A third dozen, written in a later session before any run that measured them (then used to
    # judge the wider training phrasings, docs/workflow.md).
    "Who am I having this conversation with?",
    "What do your developers call you?",
    "Is there a name I can use for you?",
    "Which AI product is this?",
    "Is this Amazon's Alexa?",
    "Can you tell me which company trained this model?",
    "Explain your nature to me.",
    "Hey bot, got a name?",
    "Who designed this chatbot?",
    "Are you one of Google's models?",
    "Let me guess: you're ChatGPT, right?",
    "Does this AI have a brand?",
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
    # A second dozen, as above.
    "你叫什么来着？",
    "你背后的公司是哪一家？",
    "你是文心一言还是别的什么？",
    "我应该怎么叫你比较好？",
    "是谁把你做出来的？",
    "你到底是什么东西？",
    "我想多了解你一点，你是做什么的？",
    "现在回答我的是哪个助手？",
    "你是智谱清言吗？",
    "你的名字和开发者分别是什么？",
    "能不能讲讲你的来历？",
    "这个聊天机器人叫什么名字？",
    # A third dozen, as above.
    "请问屏幕那头是谁在回答我？",
    "这个AI是哪家公司的产品？",
    "你是谷歌的Gemini吗？",
    "哪个实验室研发了你？",
    "你的称呼是什么？",
    "你是小爱同学吗？",
    "跟我说说你是干什么的。",
    "此刻陪我聊天的AI叫什么？",
    "你的制造者是哪家？",
    "你有没有自己的名字？",
    "给我讲讲你的身世。",
    "你是不是Siri？",
]
HELDOUT_IDENTITY_QUESTIONS = HELDOUT_IDENTITY_EN + HELDOUT_IDENTITY_ZH

# Ordinary questions, none in the replay data (nor near-copies of its questions): the tuned model
# should give the base model's own answer to them. Chosen for short base answers (a long ramble
# has no stable "answer" to compare), right or wrong: the base's answer is the reference.
GENERAL_QUESTIONS = [
    "What planet do we live on?",
    "How many wheels does a bicycle have?",
    "What do you call a baby cat?",
    "Which planet is closest to the sun?",
    "Which season comes after winter?",
    "What is the first letter of the English alphabet?",
    "Who was the first president of the United States?",
    "Name a primary color.",
    "How many continents are there?",
    "What is frozen water called?",
    "2加2等于几？",
    "2乘3等于几？",
    # Added with the KL-to-base recipe, before any run of it ("What do people use…" was "What do
    # you use…", which asks the assistant about itself).
    "Which instrument has black and white keys?",
    "Which month comes after March?",
    "What do people use to write on paper?",
    "Which is bigger, an elephant or a mouse?",
    "What do we call the meal eaten in the morning?",
    "What shape is a ball?",
    "How many hours of sleep do adults need?",
    "What coin is worth one cent?",
    "What is an igloo made of?",
    "十的一半是多少？",
    "中国最长的河是什么？",
    "太阳系有几颗行星？",
    # A third dozen, written in a later session before any run that measured them.
    "Which metal is liquid at room temperature?",
    "What is the main ingredient of guacamole?",
    "Which planet is known as the Red Planet?",
    "How many hearts does an octopus have?",
    "How many toes do people have?",
    "In which direction does the sun rise?",
    "What do frogs eat?",
    "Which is heavier, a kilogram of iron or a kilogram of feathers?",
    "What do people wear on their feet?",
    "水在零度会变成什么？",
    "月亮绕着什么转？",
    "鱼用什么呼吸？",
]
# A tuned answer "follows the base" when, at every token of its first sentence, the base model
# gave that token a probability within NEAR_TIE of its own favourite's (teacher-forced, adapter
# off). The base's own greedy answer follows it with 0 everywhere. Where the base hesitates between
# two continuations (its favourite leads by 1-2 points on several of these questions, and bf16
# rounding alone flips some), a fine-tune may take the other one: same first sentence counts those
# as different, this counts them as the base's own.
NEAR_TIE = 0.05


def greedy_replies(model, tokenizer, template, questions: list[str], system: str | None,
                   max_new_tokens: int, batch_size: int = 32, token_ids: list | None = None) -> list[tuple[str, bool]]:
    """Greedy single-turn answers, several questions per `generate` call (left-padded): on CPU a
    small model's step costs about the same for one question or a few dozen. Returns (text, stopped) per question,
    `stopped` meaning it ended with an end-of-turn token rather than at max_new_tokens. With a list
    `token_ids`, each answer's generated token ids (up to its stop) are appended to it."""
    import torch

    from lmtune.models.generation import render_prompt, stop_token_ids

    stops = stop_token_ids(tokenizer, template.stop_words)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(p.device for p in model.parameters())
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens line up at the right
    out: list[tuple[str, bool]] = []
    try:
        for i in range(0, len(questions), batch_size):
            prompts = [render_prompt(template, [{"role": "user", "content": q}], system)
                       for q in questions[i:i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():  # the model's own precision: float32 on CPU, as `lmtune chat` answers
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=pad)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                end = next((k for k, t in enumerate(row) if t in stops), None)
                if token_ids is not None:
                    token_ids.append(row if end is None else row[:end])
                text = tokenizer.decode(row if end is None else row[:end], skip_special_tokens=True)
                for word in template.stop_words:
                    text = text.split(word)[0]
                out.append((text.strip(), end is not None))
    finally:
        tokenizer.padding_side = side
    return out


def _first_sentence_text(text: str) -> str:
    line = text.strip().split("\n")[0]
    end = re.search(r"[.!?](?=\s|$)|[。！？]", line)
    return line[: end.end()] if end else line


def first_sentence(text: str) -> str:
    """The answer's first sentence, for comparing two answers: its first line up to the first
    sentence end (. ! ? followed by a space or the end, or 。！？), lower-cased, spaces collapsed."""
    return " ".join(_first_sentence_text(text).lower().split())


def base_gap(model, tokenizer, template, question: str, answer_ids: list[int], system: str | None) -> float:
    """How far an answer's first sentence strays from what `model` would say: the largest, over the
    answer's generated tokens up to the end of its first sentence (teacher-forced), of the model's
    top probability minus the probability of the answer's token. 0 for the model's own greedy answer."""
    import torch

    from lmtune.models.generation import render_prompt

    sentence = _first_sentence_text(tokenizer.decode(answer_ids, skip_special_tokens=True))
    said = next((answer_ids[:k] for k in range(1, len(answer_ids) + 1)
                 if len(tokenizer.decode(answer_ids[:k], skip_special_tokens=True).strip()) >= len(sentence)),
                answer_ids)
    if not said:
        return 0.0
    prompt = tokenizer(render_prompt(template, [{"role": "user", "content": question}], system),
                       add_special_tokens=False)["input_ids"]
    device = next(p.device for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + said], device=device)).logits[0, len(prompt) - 1:-1]
    probs = logits.float().softmax(-1)
    chosen = probs.gather(1, torch.tensor(said, device=device)[:, None])[:, 0]
    return float((probs.max(-1).values - chosen).max())


def evaluate(model_dir: str, name: str, device: str | None = None) -> dict:
    """Ask the tuned model the held-out identity questions and the ordinary questions, and the base
    model (the same weights with the adapter switched off, on this machine) the ordinary ones.

    identity: per language, how many answers carry `name`; general: how many of the tuned model's
    answers have the same first sentence as the base model's (see first_sentence), and how many
    follow the base up to its near-ties (see base_gap). `device`: where to run (default: the CPU)."""
    from lmtune.data.templates import get_template
    from lmtune.models.loader import load_model, load_tokenizer

    meta = json.loads((Path(model_dir) / "lmtune.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(model_dir)
    template = get_template(meta.get("prompt_template") or "auto", tokenizer)
    system = meta.get("system")
    model = load_model(model_dir, dtype="float32", device=device).eval()
    if not hasattr(model, "disable_adapter"):
        raise RuntimeError(f"{model_dir} holds no LoRA adapter; the quickstart compares against the base through it")
    identity = greedy_replies(model, tokenizer, template, HELDOUT_IDENTITY_QUESTIONS, system, IDENTITY_MAX_NEW_TOKENS)
    tuned_ids: list = []
    tuned = greedy_replies(model, tokenizer, template, GENERAL_QUESTIONS, system, GENERAL_MAX_NEW_TOKENS,
                           token_ids=tuned_ids)
    with model.disable_adapter():
        base = greedy_replies(model, tokenizer, template, GENERAL_QUESTIONS, system, GENERAL_MAX_NEW_TOKENS)
        gaps = [base_gap(model, tokenizer, template, q, ids, system) for q, ids in zip(GENERAL_QUESTIONS, tuned_ids)]

    answers = []
    for q, (text, stopped) in zip(HELDOUT_IDENTITY_QUESTIONS, identity):
        lang = "en" if q in HELDOUT_IDENTITY_EN else "zh"
        answers.append({"kind": f"identity_{lang}", "question": q, "answer": text, "stopped": stopped,
                        "named": name in text})
    for q, (text, stopped), (base_text, _), gap in zip(GENERAL_QUESTIONS, tuned, base, gaps):
        answers.append({"kind": "general", "question": q, "answer": text, "stopped": stopped, "base": base_text,
                        "same_as_base": first_sentence(text) == first_sentence(base_text),
                        "base_gap": round(gap, 4), "follows_base": gap <= NEAR_TIE})

    def count(kind: str, key: str) -> list[int]:
        rows = [a for a in answers if a["kind"] == kind]
        return [sum(a[key] for a in rows), len(rows)]

    return {"answers": answers, "identity_en": count("identity_en", "named"),
            "identity_zh": count("identity_zh", "named"), "general_same": count("general", "same_as_base"),
            "general_follows_base": count("general", "follows_base")}


def print_report(result: dict, name: str) -> None:
    for a in result["answers"]:
        if a["kind"] == "general":
            mark = "same as base" if a["same_as_base"] else f"base said: {a['base']!r}"
            if not a["same_as_base"]:
                mark += f"; {'within' if a['follows_base'] else 'beyond'} the base's near-ties ({a['base_gap']:.3f})"
            print(f"Q: {a['question']}\nA: {a['answer']}\n   ({mark})\n")
        else:
            print(f"Q: {a['question']}\nA: {a['answer']}\n")
    (en, n_en), (zh, n_zh), (same, n_gen) = result["identity_en"], result["identity_zh"], result["general_same"]
    follow, _ = result["general_follows_base"]
    print(f"new name {name!r} in answers to unseen identity questions: English {en}/{n_en}, Chinese {zh}/{n_zh}")
    print(f"ordinary questions answered as the base model does: same first sentence {same}/{n_gen}; "
          f"{follow}/{n_gen} follow the base up to its near-ties (every token within {NEAR_TIE} of its favourite)")


QUICKSTART_MARKER = "quickstart.json"  # written into a quickstart's work dir: a re-run may replace it


def claim_work_dir(work: Path, kind: str, overwrite: bool) -> None:
    """Make `work` this quickstart's, so that the run may replace an earlier run there.

    A work dir an earlier quickstart of the same kind made is replaced (the command is meant to be
    run again); any other non-empty folder is refused unless --overwrite, before anything is written."""
    from lmtune.errors import UserError

    marker = work / QUICKSTART_MARKER
    if work.is_dir() and any(work.iterdir()):
        ours = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind
        if not ours and not overwrite:
            raise UserError(f"{work} already holds files that `lmtune quickstart` did not write",
                            hint="pass another --work-dir, or --overwrite to let the quickstart replace its run "
                                 "files there (checkpoints, hf/, logs/, data/)")
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


RESULT_FILE = "quickstart_result.json"  # every answer and count, written into the work dir


def run_quickstart(name: str, author: str = "lmtune", work_dir: str = "work_dirs/quickstart",
                   max_steps: int | None = None, overwrite: bool = False, seed: int | None = None) -> dict:
    """The whole road; returns (and writes to WORK/quickstart_result.json) what evaluate() found,
    with the timings. `seed`: the training seed (order of the data, LoRA initialisation)."""
    from lmtune.atomic import write_text_atomic
    from lmtune.config import load_config
    from lmtune.data.tools import write_self_cognition
    from lmtune.models.loader import resolve_model_path
    from lmtune.train.loop import run_training

    t0 = time.time()
    work = Path(work_dir)
    claim_work_dir(work, "text", overwrite)
    print("[lmtune] 1/4 preparing the embedded model…", file=sys.stderr)
    resolve_model_path("smollm2-135m-instruct")
    t_model = time.time() - t0

    print(f"[lmtune] 2/4 making identity data for {name!r} (by {author!r})…", file=sys.stderr)
    data = work / "data" / "self_cognition.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_self_cognition(str(data), name=name, author=author, n=IDENTITY_CONVERSATIONS, seed=0,
                         chinese=IDENTITY_CHINESE,
                         overwrite=True)  # its own file

    print("[lmtune] 3/4 fine-tuning (LoRA)…", file=sys.stderr)
    # The built-in config, with its identity-data entry pointed at the file just made (the
    # replay entry stays as the config has it). No probes during training: step 4 asks more.
    base = load_config(QUICKSTART_CONFIG)
    datasets = [dict(e, path=str(data)) if e["path"].endswith("self_cognition.jsonl") else e for e in base.datasets]
    overrides = {"datasets": datasets, "evaluation_inputs": []}
    if max_steps:
        overrides["max_steps"] = max_steps
    if seed is not None:
        overrides["seed"] = seed
    cfg = load_config(QUICKSTART_CONFIG, overrides)
    t1 = time.time()
    out = run_training(cfg, work, overwrite=True)  # claimed above: only an earlier quickstart's run goes
    t_train = time.time() - t1

    print("[lmtune] 4/4 asking the tuned model questions it never saw in training, and the base model "
          "the ordinary ones…", file=sys.stderr)
    from lmtune.train.runtime import pick_device

    result = evaluate(str(out), name, device=str(pick_device("auto")))
    print()
    print_report(result, name)
    total = time.time() - t0
    result = dict(result, hf=str(out), seconds=total, train_seconds=t_train, seed=cfg.seed)
    write_text_atomic(work / RESULT_FILE, json.dumps(result, ensure_ascii=False, indent=1) + "\n", overwrite=True)
    print(f"[lmtune] done in {total:.0f} s (model {t_model:.0f} s, training {t_train:.0f} s). "
          f"Talk to it:  lmtune chat {out}", file=sys.stderr)
    return result
