"""The DPO demo on the embedded model: teach SmolLM2-135M-Instruct to stop instead of rambling.

The base model answers open questions at length and often runs on until it is cut off,
repeating itself (what the user's documents call the tuned model that "goes crazy"). Preference
pairs are built from its own greedy answers: chosen = the first sentence or two of its answer
(concise, and it ends); rejected = the answer as it came, running on. DPO on those pairs, then on
prompts not used in training: fewer runaway answers, a positive reward margin on held-out pairs,
and ordinary short answers unchanged.

    python scripts/concise_demo.py make-pairs            # regenerate src/lmtune/data/concise_pairs.jsonl
    lmtune train smollm2_135m_dpo_concise --work-dir work_dirs/concise
    python scripts/concise_demo.py evaluate work_dirs/concise

`evaluate` prints the base and tuned answers, the share of runaway answers (no end of turn
within MAX_NEW_TOKENS, or a repeated 4-word phrase), the held-out preference accuracy (the tuned
model's implicit reward prefers the concise answer on pairs built the same way from held-out
prompts) and, for ordinary short questions, which answers changed and whether the tuned model
still gives the fact the base model gave. tests/test_preference_demo.py runs the same steps.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

SYSTEM = "You are a helpful assistant."
MAX_NEW_TOKENS = 64  # an answer that has not ended by then counts as running on
PAIR_TOKENS = 96  # how much of the base's answer the script generates for a pair

TRAIN_OPEN = [
    "Tell me about the moon.", "Explain how rain forms.", "Describe a cat.", "Why is exercise important?",
    "Tell me about Paris.", "What is music?", "How do airplanes fly?", "Give me advice about studying.",
    "Tell me a fact about dolphins.", "What is friendship?", "Describe the ocean.", "Explain what a computer does.",
    "Tell me about volcanoes.", "What is a rainbow?", "Describe a forest.", "Why do people travel?",
    "Tell me about the sun.", "Explain how plants grow.", "What is a library?", "Describe winter.",
    "Tell me about elephants.", "Why is sleep important?", "What is the internet?", "Describe a city at night.",
    "Explain what gravity is.", "Tell me about bread.", "What makes a good teacher?", "Describe a river.",
    "Tell me about bicycles.", "Why do leaves change color?", "What is a museum?", "Explain how a car works.",
    "Tell me about coffee.", "Describe a mountain.", "What is kindness?", "Explain what electricity is.",
    "Tell me about the desert.", "Why do birds sing?", "What is history?", "Describe a garden.",
]
# Short questions the base answers well and briefly: pairs that keep its answer and reject a
# repeating one, so "stop" is learnt without learning to cut good answers.
TRAIN_SHORT = [
    "What is the capital of Italy?", "What is 5 plus 3?", "How many legs does a spider have?",
    "What color is the sky on a clear day?", "Who wrote Romeo and Juliet?", "What do bees make?",
    "What is the opposite of hot?", "How many days are in a week?",
]
HELDOUT_OPEN = [
    "Tell me about the stars.", "Explain how snow forms.", "Describe a dog.", "Why is reading important?",
    "Tell me about London.", "What is art?", "How do boats float?", "Give me advice about cooking.",
    "Tell me a fact about whales.", "What is happiness?", "Describe the sky.", "Explain what a phone does.",
]
# Short questions with the word the base model's right answer contains (with SYSTEM, greedy).
ORDINARY = {
    "What is the capital of France?": "Paris", "What is the capital of Japan?": "Tokyo",
    "What is the capital of Germany?": "Berlin", "What is the capital of Canada?": "Ottawa",
    "How many hours are in a day?": "24", "What is the largest ocean on Earth?": "Pacific",
    "What gas do plants absorb from the air?": "carbon dioxide", "What is the chemical symbol for water?": "H2O",
}

DATA = Path(__file__).resolve().parents[1] / "src/lmtune/data/concise_pairs.jsonl"


# --------------------------------------------------------------------------- generation and measures


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Greedy answers, batched (left padding): [{"prompt", "answer", "ids", "stopped"}]."""
    from lmtune.data.templates import get_template
    from lmtune.models.generation import stop_token_ids

    template = get_template("auto", tokenizer)
    stops = stop_token_ids(tokenizer, template.stop_words)
    texts = [template.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}],
                             add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    was = model.training
    model.eval()
    model.config.use_cache = True
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)
    model.config.use_cache = False
    model.train(was)
    results = []
    for p, row in zip(prompts, out[:, enc["input_ids"].shape[1]:].tolist()):
        end = next((i for i, t in enumerate(row) if t in stops), None)
        ids = row if end is None else row[:end]
        results.append({"prompt": p, "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(), "ids": ids,
                        "stopped": end is not None})
    return results


def repeats(text: str, n: int = 4, times: int = 2) -> bool:
    """Some n-word phrase occurs `times` times or more (counting non-overlapping occurrences)."""
    words = re.findall(r"\w+", text.lower())
    seen: dict[tuple, int] = {}
    last: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if i >= last.get(g, -n):
            seen[g] = seen.get(g, 0) + 1
            last[g] = i + n
            if seen[g] >= times:
                return True
    return False


def runaway(result: dict) -> bool:
    return not result["stopped"] or repeats(result["answer"])


def concise(answer: str) -> str | None:
    """The first sentence (or two, if the first is very short) of an answer; None if there is none."""
    body = answer.strip().split("\n")[0]
    sentences = re.findall(r"[^.!?]*[.!?]", body)
    if not sentences:
        return None
    out = sentences[0].strip()
    if len(out.split()) < 6 and len(sentences) > 1:
        out = (out + " " + sentences[1].strip()).strip()
    if len(out.split()) < 3 or repeats(out):
        return None
    return out


# --------------------------------------------------------------------------- make-pairs


def make_pairs(model, tokenizer) -> list[dict]:
    pairs = []
    for r in generate(model, tokenizer, TRAIN_OPEN, PAIR_TOKENS):
        short = concise(r["answer"])
        if runaway(r) and short and short != r["answer"]:
            pairs.append({"prompt": r["prompt"], "chosen": short, "rejected": r["answer"]})
        else:
            print(f"skipped (no runaway to contrast): {r['prompt']!r} -> {r['answer']!r}", file=sys.stderr)
    for r in generate(model, tokenizer, TRAIN_SHORT, PAIR_TOKENS):
        if r["stopped"] and not repeats(r["answer"]):
            pairs.append({"prompt": r["prompt"], "chosen": r["answer"],
                          "rejected": " ".join([r["answer"]] * 3)})
    return pairs


# --------------------------------------------------------------------------- evaluate


def heldout_pairs(base_answers: list[dict]) -> list[dict]:
    """Preference pairs built the same way from the held-out prompts' base answers."""
    out = []
    for r in base_answers:
        short = concise(r["answer"])
        if runaway(r) and short and short != r["answer"]:
            out.append({"prompt": r["prompt"], "chosen": short, "rejected": r["answer"]})
    return out


def judged(result: dict, tokenizer, budget: int = MAX_NEW_TOKENS) -> dict:
    """A longer greedy generation seen as if it had been cut at `budget` new tokens."""
    if len(result["ids"]) <= budget:
        return result
    ids = result["ids"][:budget]
    return dict(result, ids=ids, stopped=False, answer=tokenizer.decode(ids, skip_special_tokens=True).strip())


def evaluate(model, tokenizer, adapter_model, beta: float = 0.1, log=print) -> dict:
    """Base (adapter off) and tuned answers on held-out prompts; held-out preference accuracy."""
    from lmtune.data.conversation import Message
    from lmtune.data.preference import Preference, encode_preferences, make_units, unit_row
    from lmtune.data.templates import get_template
    from lmtune.train.objectives.base import Forward
    from lmtune.train.objectives.preference import preference_batch, sequence_logps

    with adapter_model.disable_adapter():
        base_full = generate(model, tokenizer, HELDOUT_OPEN, PAIR_TOKENS)  # as long as the training pairs'
        base_ord = generate(model, tokenizer, list(ORDINARY))
    base_open = [judged(r, tokenizer) for r in base_full]
    tuned_open = generate(model, tokenizer, HELDOUT_OPEN)
    tuned_ord = generate(model, tokenizer, list(ORDINARY))
    for b, t in zip(base_open, tuned_open):
        log(f"Q: {b['prompt']}\n  base{' (runs on)' if runaway(b) else ''}: {b['answer']}\n"
            f"  tuned{' (runs on)' if runaway(t) else ''}: {t['answer']}")
    same = [b["answer"] == t["answer"] for b, t in zip(base_ord, tuned_ord)]
    # An ordinary answer is kept when the tuned model still gives the fact the base model gave.
    facts = [(ORDINARY[b["prompt"]].lower() in b["answer"].lower(), ORDINARY[b["prompt"]].lower() in t["answer"].lower())
             for b, t in zip(base_ord, tuned_ord)]
    for b, t, s in zip(base_ord, tuned_ord, same):
        log(f"Q: {b['prompt']}\n  base: {b['answer']}\n  tuned: {t['answer']}{'' if s else '   <- changed'}")

    # Held-out preference accuracy: does the tuned model's implicit reward rank the concise answer
    # above the runaway one, on pairs built (as for training) from prompts it never saw?
    template = get_template("auto", tokenizer)
    system = [Message("system", SYSTEM, False)]
    prefs = [Preference(system + [Message("user", p["prompt"], False)], [Message("assistant", p["chosen"])],
                        [Message("assistant", p["rejected"])]) for p in heldout_pairs(base_full)]
    units, _ = make_units(encode_preferences(prefs, tokenizer, template), "dpo", 512)
    batch = preference_batch([unit_row(u) for u in units])
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    was = model.training
    model.eval()
    with torch.no_grad():
        policy = sequence_logps(model, batch, Forward())
        with adapter_model.disable_adapter():
            ref = sequence_logps(model, batch, Forward())
    model.train(was)
    ratio = policy - ref
    margin = beta * (ratio[batch["chosen_seq"]] - ratio[batch["rejected_seq"]])
    result = {
        "runaway_base": sum(map(runaway, base_open)) / len(base_open),
        "runaway_tuned": sum(map(runaway, tuned_open)) / len(tuned_open),
        "heldout_pairs": int(margin.numel()),
        "heldout_accuracy": float((margin > 0).float().mean()) if margin.numel() else 0.0,
        "heldout_margin": float(margin.mean()) if margin.numel() else 0.0,
        "ordinary_unchanged": sum(same) / len(same),
        "ordinary_fact_kept": sum(t for b, t in facts if b) / max(1, sum(b for b, _ in facts)),
        "ordinary_base_right": sum(b for b, _ in facts) / len(facts),
        "ordinary_stopped": sum(t["stopped"] for t in tuned_ord) / len(tuned_ord),
        "tokens_per_answer_base": sum(len(b["ids"]) for b in base_open) / len(base_open),
        "tokens_per_answer_tuned": sum(len(t["ids"]) for t in tuned_open) / len(tuned_open),
    }
    log(json.dumps(result, indent=1))
    return result


def _load(work_dir: str):
    from peft import PeftModel

    from lmtune.models.loader import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype="float32")
    model = PeftModel.from_pretrained(model, str(Path(work_dir) / "hf"))
    return model, tok


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-pairs"]:
        from lmtune.models.loader import load_model, load_tokenizer

        tok = load_tokenizer("smollm2-135m-instruct")
        model = load_model("smollm2-135m-instruct", dtype="float32")
        pairs = make_pairs(model, tok)
        DATA.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        print(f"wrote {len(pairs)} pairs to {DATA}")
        return 0
    if argv[:1] == ["evaluate"] and len(argv) == 2:
        model, tok = _load(argv[1])
        evaluate(model, tok, model)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
