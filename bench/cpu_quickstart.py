"""CPU benchmark: the quickstart self-cognition LoRA fine-tune through lmtune's own Trainer (the
code `lmtune train` runs) and through Hugging Face Trainer + PEFT, side by side.

Same model (embedded SmolLM2-135M-Instruct), same samples (identity + replay; exactly one epoch of
steps × batch samples for every stack, so each sees the same samples and tokens), same LoRA (r 16,
all linear layers), same optimizer settings, samples per step, steps and precision (bf16 autocast).
HF runs as a competent user runs it on CPU (liger's kernels need a GPU): defaults (pad to the
longest), + length grouping (`train_sampling_strategy="group_by_length"`), and padding-free
(`DataCollatorWithFlattening`). Each stack runs in its own subprocess so peak RSS is its own.
Tokens/s counts real (non-padding) tokens.

    python bench/cpu_quickstart.py [--steps 12] [--batch 16]

Prints a markdown table; paste it into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
LR = 5e-4
MAX_LENGTH = 512


def make_samples(work: Path, n: int) -> Path:
    """Encoded samples (input_ids, labels) written once and fed to both stacks."""
    from lmtune.config import load_config
    from lmtune.data.dataset import build_dataset
    from lmtune.data.templates import get_template
    from lmtune.data.tools import write_self_cognition
    from lmtune.models.loader import load_tokenizer

    data = work / "self_cognition.jsonl"
    write_self_cognition(str(data), name="Ada", author="Bench", n=300, seed=0)
    cfg = load_config("smollm2_135m_lora_self_cognition", {
        "datasets": [{"path": str(data)}, {"path": "lmtune:replay_general.jsonl", "repeat": 2}],
        "pack_to_max_length": False, "max_length": MAX_LENGTH})
    tok = load_tokenizer(cfg.model)
    rows = build_dataset(cfg, tok, get_template(cfg.prompt_template, tok)).rows
    rows = [{"input_ids": list(map(int, r["input_ids"])), "labels": list(map(int, r["labels"]))} for r in rows][:n]
    out = work / "samples.json"
    out.write_text(json.dumps(rows))
    return out


def run_lmtune(samples: Path, steps: int, batch: int, work: Path, variant: str) -> dict:
    """lmtune's Trainer (as `lmtune train` builds it), given the samples; its own step() timed."""
    import torch

    from lmtune.config import load_config
    from lmtune.train.loop import Trainer

    rows = json.loads(samples.read_text())[: steps * batch]
    cfg = load_config("smollm2_135m_lora_self_cognition", {
        "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0, "lora_target_modules": "all-linear",
        "lora_layers": None,  # every layer, as the PEFT baseline (the quickstart skips the first five)
        "lr": LR, "lr_scheduler": "constant", "warmup_ratio": 0.0, "batch_size": batch, "accumulative_counts": 1,
        "max_steps": steps, "max_length": MAX_LENGTH, "pack_to_max_length": False, "mixed_precision": "bf16",
        "max_norm": 1.0, "evaluation_inputs": [], "seed": 0})
    t = Trainer(cfg, work / "lmtune_run", rows=rows)
    t.setup()
    tokens, losses, step_s = 0, [], []
    t0 = time.time()
    for _ in range(steps):
        before, ts = t.state.tokens_seen, time.time()
        loss, _ = t.step()
        step_s.append(time.time() - ts)
        tokens += t.state.tokens_seen - before
        losses.append(loss)
    assert torch.isfinite(torch.tensor(losses)).all()
    return {"seconds": time.time() - t0, "tokens": tokens, "first_loss": losses[0], "last_loss": losses[-1],
            "step_s": step_s}


def run_hf(samples: Path, steps: int, batch: int, work: Path, variant: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                              Trainer, TrainerCallback, TrainingArguments)

    from lmtune.models.loader import resolve_model_path

    torch.manual_seed(0)
    rows = json.loads(samples.read_text())[: steps * batch]
    path = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(task_type="CAUSAL_LM", **LORA))
    extra = {"train_sampling_strategy": "group_by_length"} if variant == "grouped" else {}
    args = TrainingArguments(
        output_dir=str(work / "hf_trainer"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", max_steps=steps, bf16=True, logging_steps=1,
        save_strategy="no", report_to=[], max_grad_norm=1.0, dataloader_num_workers=0, use_cpu=True,
        remove_unused_columns=False, seed=0, data_seed=0, disable_tqdm=True, **extra,
    )

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0, self.step_s = time.time(), []

        def on_step_begin(self, *a, **k):
            self.ts = time.time()

        def on_step_end(self, *a, **k):
            self.step_s.append(time.time() - self.ts)

        def on_train_end(self, *a, **k):
            self.t1 = time.time()

    timer = Timer()
    if variant == "padding_free":  # one row per batch, position_ids restart per sample
        collator = DataCollatorWithFlattening()
        data = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    else:
        collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
        data = [{"input_ids": r["input_ids"], "labels": r["labels"], "attention_mask": [1] * len(r["input_ids"])}
                for r in rows]
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[timer])
    result = trainer.train()
    logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {"seconds": timer.t1 - timer.t0, "tokens": tokens, "first_loss": logs[0], "last_loss": logs[-1],
            "train_runtime": result.metrics.get("train_runtime"), "step_s": timer.step_s}


STACKS = {  # name in the table: (runner, variant)
    "HF Trainer + PEFT, defaults (pad to longest)": ("hf", "pad"),
    "HF Trainer + PEFT + length grouping": ("hf", "grouped"),
    "HF Trainer + PEFT + padding-free collator": ("hf", "padding_free"),
    "lmtune (its Trainer: padding-free, loss-only logits)": ("lmtune", ""),
}


def child(which: str, samples: str, steps: int, batch: int, work: str) -> None:
    runner, variant = STACKS[which]
    fn = run_lmtune if runner == "lmtune" else run_hf
    out = fn(Path(samples), steps, batch, Path(work), variant)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16, help="samples per optimizer step")
    ap.add_argument("--child", nargs=4, metavar=("WHICH", "SAMPLES", "STEPS", "BATCH"))
    args = ap.parse_args()
    if args.child:
        which, samples, steps, batch = args.child
        child(which, samples, int(steps), int(batch), str(Path(samples).parent))
        return
    work = Path(tempfile.mkdtemp(prefix="lmtune_bench_"))
    samples = make_samples(work, args.steps * args.batch)
    results = {}
    for which in STACKS:
        proc = subprocess.run([sys.executable, __file__, "--child", which, str(samples), str(args.steps),
                               str(args.batch)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
        results[which] = json.loads(line[0][7:])
        results[which]["tok_s"] = results[which]["tokens"] / results[which]["seconds"]
    lm = results[list(STACKS)[-1]]
    best_hf = max((r for k, r in results.items() if STACKS[k][0] == "hf"), key=lambda r: r["tok_s"])
    print(f"CPU quickstart fine-tune: SmolLM2-135M-Instruct, LoRA r16 all-linear, bf16 autocast, "
          f"{args.steps} steps × {args.batch} samples (one epoch, same samples for every stack), max_length "
          f"{MAX_LENGTH}; {os.cpu_count()} cores, {platform.processor() or platform.machine()}\n")
    print("| stack | wall s | tokens/s | step s median (min–max) | peak RSS MB | loss first → last |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        steps_s = r["step_s"]
        print(f"| {name} | {r['seconds']:.1f} | {r['tok_s']:.0f} | {statistics.median(steps_s):.2f} "
              f"({min(steps_s):.2f}–{max(steps_s):.2f}) | {r['peak_rss_mb']:.0f} | "
              f"{r['first_loss']:.3f} → {r['last_loss']:.3f} |")
    print(f"| **lmtune ÷ best HF** | {lm['seconds'] / best_hf['seconds']:.2f}× time | "
          f"**{lm['tok_s'] / best_hf['tok_s']:.2f}×** | | {lm['peak_rss_mb'] / best_hf['peak_rss_mb']:.2f}× | |")


if __name__ == "__main__":
    main()
