"""`lmtune quickstart --vision`: a LLaVA taught to see, on the CPU, in a few minutes.

No vision weights can be downloaded here (and no PyPI package ships any), so the LLaVA is composed
from the embedded SmolLM2-135M-Instruct (frozen) and a small, randomly initialised CLIP-style tower
that trains together with the projector. The task is generated on the fly:
32x32 pictures of a 2x2 grid holding one coloured square and up to three dark circles, and two
kinds of questions: "What colour is the square?" and "How many circles are there?". Held-out
pictures come from another seed; the tuned model's greedy answers are scored against the truth and
against chance (1 in 4 for each kind).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from lmtune.quickstart import claim_work_dir

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
CELL = 16  # one grid cell = one patch of the tower
QUESTIONS = {"colour": "What colour is the square?", "count": "How many circles are there?"}
SYSTEM = "Answer with one word."


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


CIRCLE = (40, 40, 40)  # circles are dark grey: the square is the one coloured shape


def make_picture(rng: random.Random):
    """A 2x2 grid: one coloured square and 0-3 dark circles in random cells. Returns (image, facts)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (2 * CELL, 2 * CELL), "white")
    draw = ImageDraw.Draw(img)
    cells = rng.sample(range(4), 1 + rng.randrange(4))
    names = list(COLOURS)
    facts = {"square": None, "circles": len(cells) - 1}
    for k, cell in enumerate(cells):
        x, y = (cell % 2) * CELL, (cell // 2) * CELL
        colour = rng.choice(names)
        box = [x + 2, y + 2, x + CELL - 3, y + CELL - 3]
        if k == 0:
            draw.rectangle(box, fill=COLOURS[colour])
            facts["square"] = colour
        else:
            draw.ellipse(box, fill=CIRCLE)
    return img, facts


def answer(facts: dict, kind: str) -> str:
    return facts["square"] if kind == "colour" else str(facts["circles"])


def write_dataset(folder: Path, n: int, seed: int) -> Path:
    """n pictures (PNG) and one conversation per question about each, LLaVA format."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img, facts = make_picture(rng)
        img.save(folder / "images" / f"{i}.png")
        for kind in QUESTIONS:
            records.append({"image": f"images/{i}.png", "kind": kind, "conversations": [
                # the picture right before the answer: the tiny model learns to look at it sooner
                {"from": "human", "value": f"{QUESTIONS[kind]}\n<image>"},
                {"from": "gpt", "value": answer(facts, kind)}]})
    path = folder / "shapes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_tower(folder: Path, seed: int = 0) -> Path:
    """A small random CLIP vision tower on 32x32 pictures, one 16x16 patch per grid cell."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=2 * CELL, patch_size=CELL, projection_dim=128)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 2 * CELL}, crop_size={"height": 2 * CELL, "width": 2 * CELL},
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)
    return folder


def evaluate(model_dir: str, data: Path, max_new_tokens: int = 4) -> dict:
    """Greedy answers of a trained LLaVA folder (plain transformers + its processor) to every
    question of `data`; accuracy per kind of question."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = processor.tokenizer
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    right = {k: 0 for k in QUESTIONS}
    seen = {k: 0 for k in QUESTIONS}
    examples = []
    for line in data.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        question, truth = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.open(data.parent / rec["image"]).convert("RGB")
        inputs = processor(text=prompt, images=image, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        seen[rec["kind"]] += 1
        ok = reply.split()[0].strip(".").lower() == truth if reply else False
        right[rec["kind"]] += ok
        if len(examples) < 6:
            examples.append({"image": rec["image"], "question": question.split("\n")[0], "answer": reply,
                             "truth": truth})
    return {"accuracy": {k: right[k] / max(1, seen[k]) for k in QUESTIONS}, "n": seen, "examples": examples}


def run_vision_quickstart(work_dir: str = "work_dirs/quickstart_vision", max_steps: int | None = None,
                          n_train: int = 600, n_test: int = 60, overwrite: bool = False) -> dict:
    from lmtune.config import load_config
    from lmtune.models.loader import resolve_model_path
    from lmtune.train.loop import run_training

    t0 = time.time()
    work = Path(work_dir)
    claim_work_dir(work, "vision", overwrite)
    _log("1/4 preparing the embedded model and a small random vision tower…")
    resolve_model_path("smollm2-135m-instruct")
    tower = make_tower(work / "tower")
    _log(f"2/4 drawing {n_train} training pictures (seed 0) and {n_test} held-out ones (seed 1)…")
    train = write_dataset(work / "data" / "train", n_train, seed=0)
    test = write_dataset(work / "data" / "test", n_test, seed=1)
    _log("3/4 training the LLaVA (tower + projector whole, the LLM frozen)…")
    overrides = {"vision_tower": str(tower), "datasets": [str(train)]}
    if max_steps:
        overrides["max_steps"] = max_steps
    cfg = load_config("smollm2_135m_llava_shapes", overrides)
    t1 = time.time()
    out = run_training(cfg, work, overwrite=True)  # claimed above: only an earlier quickstart's run goes
    t_train = time.time() - t1
    _log(f"4/4 asking the tuned model about {n_test} pictures it never saw…")
    result = evaluate(str(out), test)
    print()
    for ex in result["examples"]:
        print(f"{ex['image']}: Q: {ex['question']}  A: {ex['answer']}  (truth: {ex['truth']})")
    acc = result["accuracy"]
    print(f"\nheld-out accuracy: colour of the square {acc['colour']:.0%}, number of circles {acc['count']:.0%} "
          f"(chance 25% each; {sum(result['n'].values())} questions on {n_test} new pictures)")
    total = time.time() - t0
    _log(f"done in {total:.0f} s (training {t_train:.0f} s). Talk to it:  lmtune chat {out} --image "
         f"{test.parent / 'images' / '0.png'}")
    return {"hf": str(out), **result, "seconds": total, "train_seconds": t_train}
