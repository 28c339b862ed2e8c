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
QUESTIONS = [
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
    "What is the capital of Germany?", "What is the capital of Spain?", "What is the capital of Canada?",
    "What is 2 + 2?", "What is 7 times 8?", "What is 15 minus 6?", "What is 100 divided by 4?",
    "What is 12 plus 30?", "How many days are in a week?", "How many legs does a spider have?",
    "Translate 'good morning' into French.", "Translate 'thank you' into Spanish.",
    "Translate 'cat' into German.", "What color is the sky on a clear day?",
    "What is the boiling point of water in Celsius?", "What is the largest planet in our solar system?",
    "Who wrote Romeo and Juliet?", "What gas do plants absorb from the air?",
    "Name three primary colors.", "What is the opposite of hot?", "How many continents are there?",
    "What is the chemical symbol for water?", "Give me a synonym for happy.",
    "Write a short sentence about the ocean.", "What is a noun?", "What do bees make?",
    "Name a fruit that is yellow.", "What is the freezing point of water in Fahrenheit?",
    "How many hours are in a day?", "What is the square root of 81?", "Which animal is known as the king of the jungle?",
    "What is the tallest mountain in the world?", "Give me a tip for better sleep.",
    "What is photosynthesis in one sentence?", "Write a haiku about autumn.",
    "How do you say hello in Chinese?", "What is the main language spoken in Brazil?",
    "Explain what a computer is in one sentence.", "What is the largest ocean on Earth?",
    "How many minutes are in an hour?", "What is 9 squared?", "Suggest a name for a pet dog.",
    "What is the capital of Australia?", "List three vegetables.", "What does a thermometer measure?",
    "中国的首都是哪里？", "3加5等于多少？", "请用英语说“谢谢”。", "一年有几个月？",
]


def main():
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype="float32").eval()
    out = Path(__file__).resolve().parents[1] / "src/lmtune/data/replay_general.jsonl"
    rows = []
    for q in QUESTIONS:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=96, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id)
        new = gen[0, ids["input_ids"].shape[1]:]
        stopped = new[-1].item() == tok.eos_token_id
        answer = tok.decode(new, skip_special_tokens=True).strip()
        print(f"{'ok ' if stopped else 'CUT'} {q!r} -> {answer!r}", flush=True)
        if stopped and answer:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} of {len(QUESTIONS)} to {out}")


if __name__ == "__main__":
    main()
