"""Regenerate src/lmtune/data/replay_general.jsonl: general questions answered by the embedded
base model itself (greedy). Mixed into identity fine-tunes as "replay", it keeps the model's
ordinary answers while it learns its new name (see docs/workflow.md).

    python scripts/make_replay_data.py
"""

import json
from pathlib import Path

import torch

from lmtune.models.loader import load_model, load_tokenizer

SYSTEM = "You are a helpful assistant."
# (question, a word the answer must contain to be kept, or None). Answers the base model gets
# wrong are left out: replay should keep what the model does well, not teach its mistakes.
QUESTIONS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of the United Kingdom?", "London"), ("What is the capital of China?", "Beijing"),
    ("What is the capital of Russia?", "Moscow"), ("What is the capital of Egypt?", "Cairo"),
    ("What is 2 + 2?", "4"), ("What is 7 times 8?", "56"), ("What is 15 minus 6?", "9"),
    ("What is 100 divided by 4?", "25"), ("What is 12 plus 30?", "42"), ("What is 5 plus 3?", "8"),
    ("What is 10 times 10?", "100"), ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"), ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"), ("What is 9 squared?", "81"),
    ("Translate 'good morning' into French.", "Bonjour"), ("Translate 'thank you' into Spanish.", "Gracias"),
    ("Translate 'cat' into German.", "Katze"), ("Translate 'hello' into Spanish.", "Hola"),
    ("Translate 'thank you' into French.", "Merci"), ("How do you say 'yes' in German?", "Ja"),
    ("What color is the sky on a clear day?", "blue"), ("What is the boiling point of water in Celsius?", "100"),
    ("What is the largest planet in our solar system?", "Jupiter"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What gas do plants absorb from the air?", "carbon dioxide"), ("What is the opposite of hot?", "cold"),
    ("What is the chemical symbol for water?", "H2O"), ("What do bees make?", "honey"),
    ("Name a fruit that is yellow.", "anana"), ("What is the tallest mountain in the world?", "Everest"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the main language spoken in Brazil?", "Portuguese"), ("What does a thermometer measure?", "temperature"),
    ("Give me a synonym for happy.", None), ("Write a short sentence about the ocean.", None),
    ("Give me a tip for better sleep.", None), ("Write a haiku about autumn.", None),
    ("Explain what a computer is in one sentence.", None), ("Suggest a name for a pet dog.", None),
    ("List three vegetables.", None), ("What is photosynthesis in one sentence?", None),
    ("中国的首都是哪里？", "北京"), ("3加5等于多少？", "8"), ("一年有几个月？", "12"),
    ("请用英语说“谢谢”。", "Thank"),
]


def main():
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype="float32").eval()
    out = Path(__file__).resolve().parents[1] / "src/lmtune/data/replay_general.jsonl"
    rows = []
    for q, expected in QUESTIONS:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=96, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id)
        new = gen[0, ids["input_ids"].shape[1]:]
        stopped = new[-1].item() == tok.eos_token_id
        answer = tok.decode(new, skip_special_tokens=True).strip()
        right = expected is None or expected.lower() in answer.lower()
        print(f"{'ok ' if stopped and right else 'drop'} {q!r} -> {answer!r}", flush=True)
        if stopped and right and answer:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} of {len(QUESTIONS)} to {out}")


if __name__ == "__main__":
    main()
