"""CPU benchmark: the quickstart self-cognition LoRA fine-tune through lmtune and through
Hugging Face Trainer + PEFT, side by side.

Same model (embedded SmolLM2-135M-Instruct), same conversations (identity + replay, the same
samples in the same order), same LoRA (r 16, all linear layers), same optimizer settings, same
samples per step, same number of steps, same precision (bf16 autocast). Each stack runs in its
own subprocess so peak RSS is its own. Tokens/s counts real (non-padding) tokens.

    python bench/cpu_quickstart.py [--steps 12] [--batch 16]

Prints a markdown table; paste it into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def run_lmtune(samples: Path, steps: int, batch: int, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from lmtune.models.loader import load_model
    from lmtune.train.objectives import flat_batch, loss_sum

    torch.manual_seed(0)
    rows = json.loads(samples.read_text())
    model = get_peft_model(load_model("smollm2-135m-instruct", dtype="float32"),
                           LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.config.use_cache = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    tokens, losses = 0, []
    t0 = time.time()
    for step in range(steps):
        chunk = rows[step * batch:(step + 1) * batch]
        batch_t = flat_batch(chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = loss_sum(model, batch_t)
        (s / max(1, n)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(r["input_ids"]) for r in chunk)
        losses.append(float(s) / max(1, n))
    return {"seconds": time.time() - t0, "tokens": tokens, "first_loss": losses[0], "last_loss": losses[-1]}


def run_hf(samples: Path, steps: int, batch: int, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from lmtune.models.loader import resolve_model_path

    torch.manual_seed(0)
    rows = json.loads(samples.read_text())[: steps * batch]
    path = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(
        output_dir=str(work / "hf_trainer"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", max_steps=steps, bf16=True, logging_steps=1,
        save_strategy="no", report_to=[], max_grad_norm=1.0, dataloader_num_workers=0, use_cpu=True,
        remove_unused_columns=False, seed=0, data_seed=0, disable_tqdm=True,
    )

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.time()

        def on_train_end(self, *a, **k):
            self.t1 = time.time()

    timer = Timer()
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    data = [{"input_ids": r["input_ids"], "labels": r["labels"], "attention_mask": [1] * len(r["input_ids"])}
            for r in rows]
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[timer])
    # Same sample order as lmtune: no shuffling.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    result = trainer.train()
    logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {"seconds": timer.t1 - timer.t0, "tokens": tokens, "first_loss": logs[0], "last_loss": logs[-1],
            "train_runtime": result.metrics.get("train_runtime")}


def child(which: str, samples: str, steps: int, batch: int, work: str) -> None:
    fn = run_lmtune if which == "lmtune" else run_hf
    out = fn(Path(samples), steps, batch, Path(work))
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
    for which in ("hf", "lmtune"):
        proc = subprocess.run([sys.executable, __file__, "--child", which, str(samples), str(args.steps),
                               str(args.batch)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
        results[which] = json.loads(line[0][7:])
    hf, lm = results["hf"], results["lmtune"]
    for r in results.values():
        r["tok_s"] = r["tokens"] / r["seconds"]
    print(f"CPU quickstart fine-tune: SmolLM2-135M-Instruct, LoRA r16 all-linear, bf16 autocast, "
          f"{args.steps} steps × {args.batch} samples, max_length {MAX_LENGTH}; {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}\n")
    print("| stack | wall s | tokens/s | peak RSS MB | loss first → last |")
    print("|---|---|---|---|---|")
    for name, r in (("HF Trainer + PEFT (pad to longest)", hf), ("lmtune (padding-free, loss-only logits)", lm)):
        print(f"| {name} | {r['seconds']:.1f} | {r['tok_s']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['first_loss']:.3f} → {r['last_loss']:.3f} |")
    print(f"| **ratio lmtune / HF** | {lm['seconds'] / hf['seconds']:.2f}× time | "
          f"**{lm['tok_s'] / hf['tok_s']:.2f}×** | {lm['peak_rss_mb'] / hf['peak_rss_mb']:.2f}× | |")


if __name__ == "__main__":
    main()
