"""GPU benchmark: LLaVA-1.5-7B-shaped QLoRA fine-tuning, lmtune against Hugging Face Trainer + PEFT.

The model: a CLIP ViT-L/14-336 tower (24 layers, 576 image tokens per image) + a Vicuna-7B-shaped
Llama (32 layers, hidden 4096) + LLaVA's 2-layer MLP projector, randomly initialised and saved once
as a LlavaForConditionalGeneration folder (bf16) with its processor; both stacks load it from disk
with bitsandbytes NF4 on the LLM only (tower and projector bf16), LoRA r=128 / alpha 256 on every
linear layer of the LLM, the projector trained whole, the tower frozen (LLaVA-1.5's finetune
stage), bf16, gradient checkpointing, AdamW (fused), lr 2e-4.

Data: synthetic images (336x336 shapes) with one image per conversation and a text of 32-512
tokens, so samples are 600-1100 tokens long with the image tokens; about the same tokens per
optimizer step for both stacks.

- lmtune: `lmtune train`'s own path (Trainer from a config: data pipeline, image expansion,
  packing to max_length, padding-free attention, the fast path's "auto" choices), timed by
  `trainer.step()`.
- baseline: `transformers.Trainer` + PEFT + `prepare_model_for_kbit_training`, the processor as the
  collator (padding to the longest sample of the micro-batch), length grouping
  (`train_sampling_strategy="group_by_length"`) and `use_liger_kernel=True`: a competent setup.

Each stack runs in its own subprocess. Reports tokens/s (real tokens incl. image tokens, padding
excluded), peak allocated memory, and the ratio, as a markdown table.

    python bench/gpu_vision_bench.py --tokenizer DIR --work /tmp/vbench --steps 6 [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLM = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TOWER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
             patch_size=14, projection_dim=768, hidden_act="quick_gelu")
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14, projection_dim=32)
LORA_R, LORA_ALPHA, LR = 128, 256, 2e-4
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the model and data


def prepare(args):
    """A random LLaVA folder (+ processor) and a LLaVA-format dataset of synthetic images."""
    import torch
    from PIL import Image, ImageDraw
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    work = Path(args.work)
    folder = work / "llava7b"
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    image_id = tok.convert_tokens_to_ids("<image>")
    vocab = (len(tok) + 63) // 64 * 64
    llm = LlamaConfig(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **(TINY_LLM if args.tiny else LLM))
    tower = CLIPVisionConfig(**(TINY_TOWER if args.tiny else TOWER))
    size = tower.image_size
    config = LlavaConfig(text_config=llm, vision_config=tower, image_token_id=image_id, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(size // tower.patch_size) ** 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=CLIP_MEAN, image_std=CLIP_STD)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                         "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                         "{% endif %}")
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=tower.patch_size,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=tok.chat_template).save_pretrained(folder)
    log(f"random LLaVA ({n_params / 1e9:.2f}B parameters) saved to {folder} in {time.time() - t0:.0f} s")

    rng = random.Random(0)
    (work / "images").mkdir(parents=True, exist_ok=True)
    words = ["red", "green", "blue", "circle", "square", "the", "a", "is", "of", "left", "right", "big", "small",
             "image", "shows", "there", "two", "three", "and", "near"]
    records = []
    for i in range(args.samples):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            r = size // 6
            x, y = rng.randrange(size - r), rng.randrange(size - r)
            draw.ellipse([x, y, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(work / "images" / f"{i}.png")
        n = rng.randint(32, 512)
        q = " ".join(rng.choice(words) for _ in range(n // 4))
        a = " ".join(rng.choice(words) for _ in range(n - n // 4))
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (work / "data.json").write_text(json.dumps(records))
    return n_params


# ----------------------------------------------------------------------------- lmtune


def run_lmtune(args):
    import torch

    from lmtune.config import validate
    from lmtune.train.loop import Trainer

    work = Path(args.work)
    cfg = validate(dict(
        model=str(work / "llava7b"), datasets=[str(work / "data.json")], image_folder=str(work / "images"),
        prompt_template="auto", method="lora", quantization="nf4", lora_r=LORA_R, lora_alpha=LORA_ALPHA,
        lora_dropout=0.0, lora_target_modules="all-linear", train_projector="full", train_vision_tower="frozen",
        gradient_checkpointing=True, lr=LR, warmup_ratio=0.0, lr_scheduler="constant", mixed_precision="bf16",
        max_length=args.tokens_per_step, batch_size=1, accumulative_counts=1, max_steps=1000, seed=0,
        device="cuda" if torch.cuda.is_available() else "cpu", save_steps=100000))
    trainer = Trainer(cfg, work / "lmtune_work")
    trainer.setup()
    q4 = [n for n, m in trainer.model.named_modules() if type(m).__name__ == "Linear4bit"]
    log(f"lmtune: {len(q4)} 4-bit linear layers, {sum('language_model' not in n for n in q4)} outside the LLM")
    return time_steps(lambda: trainer.step(), lambda: trainer._step_tokens, args.steps)


def time_steps(step, tokens, n):
    import torch

    cuda = torch.cuda.is_available()
    step()  # warm-up (kernels, allocator, lazy init)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, toks = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        toks.append(tokens())
    rates = [k / t for k, t in zip(toks, times)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"tokens_per_s": statistics.median(rates), "spread": [min(rates), max(rates)],
            "tokens_per_step": statistics.mean(toks), "peak_gib": peak, "step_s": statistics.median(times)}


# ----------------------------------------------------------------------------- Hugging Face Trainer + PEFT


def run_hf(args):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from PIL import Image
    from transformers import (AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration, Trainer,
                              TrainerCallback, TrainingArguments)

    work = Path(args.work)
    folder = work / "llava7b"
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16,
                             llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    cuda = torch.cuda.is_available()
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, quantization_config=bnb if cuda else None, dtype=torch.bfloat16,
        device_map={"": 0} if cuda else None, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                      modules_to_save=["multi_modal_projector"])
    model = get_peft_model(model, lora)

    records = json.loads((work / "data.json").read_text())
    n_image = model.config.image_seq_length

    def render(rec, add_answer=True):
        msgs = [{"role": "user", "content": rec["conversations"][0]["value"]}]
        if add_answer:
            msgs.append({"role": "assistant", "content": rec["conversations"][1]["value"]})
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not add_answer)

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            # input_ids only for the length grouping (true lengths, image tokens included)
            self.items = [{"rec": r, "input_ids": [0] * (len(tok(render(r))["input_ids"]) + n_image - 1)}
                          for r in records]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    counted = []

    def collate(items):
        texts = [render(it["rec"]) for it in items]
        prompts = [render(it["rec"], add_answer=False) for it in items]
        images = [Image.open(work / "images" / it["rec"]["image"]).convert("RGB") for it in items]
        batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for b, p in enumerate(prompts):  # loss on the answer only (right padding: prompts start at 0)
            n_prompt = len(tok(p)["input_ids"]) + n_image - 1
            labels[b, :n_prompt] = -100
        batch["labels"] = labels
        return batch

    class CountingTrainer(Trainer):  # real tokens per step, counted in the main process (workers collate)
        def compute_loss(self, model, inputs, *a, **kw):
            counted.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *a, **kw)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]
            if state.global_step == 1 and cuda:
                torch.cuda.reset_peak_memory_stats()

    targs = TrainingArguments(
        output_dir=str(work / "hf_work"), per_device_train_batch_size=args.hf_batch, gradient_accumulation_steps=1,
        max_steps=args.steps + 1, learning_rate=LR, lr_scheduler_type="constant", bf16=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1000, save_strategy="no",
        report_to=[], remove_unused_columns=False, dataloader_num_workers=4 if cuda else 0, use_cpu=not cuda,
        train_sampling_strategy="group_by_length", use_liger_kernel=bool(cuda and args.liger), seed=0)
    CountingTrainer(model=model, args=targs, train_dataset=Data(), data_collator=collate, callbacks=[Clock()]).train()
    # One micro-batch per step (no accumulation); drop the warm-up step.
    rates = [k / t for k, t in zip(counted[1:len(times)], times[1:])]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"tokens_per_s": statistics.median(rates), "spread": [min(rates), max(rates)],
            "tokens_per_step": statistics.mean(counted[1:len(times)]), "peak_gib": peak,
            "step_s": statistics.median(times[1:])}


# ----------------------------------------------------------------------------- driver


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--work", default="/tmp/vbench")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--tokens-per-step", type=int, default=8192, help="lmtune: one packed row of this many tokens")
    ap.add_argument("--hf-batch", type=int, default=10, help="HF: samples per step (about the same tokens)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU check of the script itself")
    ap.add_argument("--no-liger", dest="liger", action="store_false")
    ap.add_argument("--stack", choices=["prepare", "lmtune", "hf"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stack == "prepare":
        print(json.dumps({"params": prepare(args)}))
        return
    if args.stack:
        result = run_lmtune(args) if args.stack == "lmtune" else run_hf(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for stack in ("prepare", "lmtune", "hf"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--stack", stack]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log(f"{stack}: exit {proc.returncode} in {time.time() - t0:.0f} s")
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            continue
        if stack == "prepare":
            results["params"] = json.loads(proc.stdout.strip().splitlines()[-1])["params"]
            continue
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        results[stack] = json.loads(line[len("RESULT "):])
        log(f"{stack}: {results[stack]}")
    print(table(results, args))


def table(results, args) -> str:
    rows = ["| stack | tokens/s (median, min–max) | tokens/step | step s | peak allocated GiB |",
            "|---|---|---|---|---|"]
    names = {"lmtune": "lmtune (packed, varlen, fast path auto)",
             "hf": "HF Trainer + PEFT + prepare_model_for_kbit_training, group_by_length, liger"}
    for k in ("hf", "lmtune"):
        r = results.get(k)
        if r:
            rows.append(f"| {names[k]} | {r['tokens_per_s']:,.0f} ({r['spread'][0]:,.0f}–{r['spread'][1]:,.0f}) | "
                        f"{r['tokens_per_step']:,.0f} | {r['step_s']:.2f} | {r['peak_gib']:.1f} |")
    if results.get("lmtune") and results.get("hf"):
        rows.append(f"\nlmtune / HF: {results['lmtune']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x "
                    f"tokens/s, {results['lmtune']['peak_gib'] / max(results['hf']['peak_gib'], 1e-9):.2f}x memory")
    return (f"LLaVA-1.5-7B shape ({results.get('params', 0) / 1e9:.2f}B parameters, CLIP-L/336 576 image "
            f"tokens/image), QLoRA NF4 r={LORA_R}, {args.steps} timed steps\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
