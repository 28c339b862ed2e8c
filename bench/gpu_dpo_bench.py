"""GPU benchmark: lmtune DPO against TRL's DPOTrainer, same GPU, same script, same pairs.

Randomly initialised models of real shapes (bench/gpu_bench.py's SHAPES): LoRA DPO on a
Llama-3-8B shape and full-fine-tuning DPO on a Qwen2.5-1.5B shape. Synthetic preference pairs of
random text (prompt 48–900 tokens, answers 48–1100, every sequence under 2048 tokens), tokenized
the way TRL tokenizes non-conversational pairs (prompt, then prompt + answer + EOS), so both
stacks train on the same token sequences. About the same real tokens per optimizer step for both
(8 pairs), bf16 autocast, gradient checkpointing, AdamW (fused), constant lr, β = 0.1, sigmoid loss.

- TRL (1.16), configured the way its docs recommend for speed and memory: reference
  log-probabilities precomputed before training (`precompute_ref_log_probs=True`: no reference
  model or reference forward during training), liger kernels (`use_liger_kernel=True`; TRL 1.16
  has no fused liger DPO loss any more, and its padding-free mode is "temporarily unavailable"),
  SDPA attention, 2 pairs per micro-batch (4 sequences padded to the longest) x 4 accumulation.
- lmtune: its own Trainer given the model and rows (`Trainer(cfg, work, model=..., rows=...,
  tokenizer=...)`), pairs packed whole into rows of up to 4096 tokens, padding-free varlen
  attention, per-token log-probabilities from the chunked output layer, liger kernels -- all
  picked by the "auto" defaults; the reference precomputed (`precompute_reference = true`) and,
  for LoRA, also live (the model with its adapter switched off, one extra no-grad forward a step).

Reports tokens/s (real tokens of chosen and rejected sequences, prompts counted in both),
peak memory during the training steps (the reference precompute excluded for both), MFU
(4·N per token for LoRA, 6·N for full fine-tuning, plus causal attention; the live reference's
extra forward not counted) and the ratios to TRL.

    python bench/gpu_dpo_bench.py --out DIR [--cases lora-8b-2048,full-1.5b-2048] [--steps 6]
        --tokenizer FOLDER   any Hugging Face tokenizer folder (ids must fit the shapes' vocabularies)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import SHAPES, bf16_peak, gib, matmul_params  # noqa: E402

SHAPES.update(tiny=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                tie_word_embeddings=True, max_position_embeddings=4096))
CASES = {
    "lora-8b-2048": dict(shape="llama3-8b", method="lora", seq=2048),
    "full-1.5b-2048": dict(shape="qwen2.5-1.5b", method="full", seq=2048),
    # a CPU smoke test of the script itself (--cases tiny-lora,tiny-full --steps 3)
    "tiny-lora": dict(shape="tiny", method="lora", seq=256),
    "tiny-full": dict(shape="tiny", method="full", seq=256),
}
# lmtune only, e.g. "lora-8b-2048+live": the reference live (adapter off) instead of precomputed;
# "+mb2": two packed rows per micro-batch (half the accumulation, the same tokens per step)
VARIANTS = {"live": {"precompute_reference": False}, "mb2": {"batch_size": 2}}
PAIRS_PER_STEP = 8
TRL_MICRO = 2  # pairs per TRL micro-batch
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
LR, BETA = 5e-6, 0.1


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


CUDA = None


def cuda() -> bool:
    global CUDA
    if CUDA is None:
        import torch

        CUDA = torch.cuda.is_available()
    return CUDA


def sync():
    import torch

    if cuda():
        torch.cuda.synchronize()


def build_model(shape: str, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device("cuda" if cuda() else "cpu"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def memory(reset: bool = False):
    import torch

    if not cuda():
        return 0.0, 0.0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return gib(torch.cuda.max_memory_allocated()), gib(torch.cuda.max_memory_reserved())


# ----------------------------------------------------------------------------- data


def make_pairs(tokenizer, n: int, seq: int, seed: int = 1) -> list[dict]:
    """Random-text pairs (for seq 2048: prompts of 48–900 tokens, answers of 48–1100), and each
    pair's token ids as TRL computes them (prompt, then prompt + answer + EOS)."""
    rng = random.Random(seed)
    vocab = [i for i in range(1000, min(40000, len(tokenizer)))]

    def text(k):
        return tokenizer.decode([rng.choice(vocab) for _ in range(k)], skip_special_tokens=True)

    out = []
    for _ in range(n):
        p_max, a_max = seq * 900 // 2048, seq * 1100 // 2048
        prompt, chosen, rejected = (text(rng.randint(48, p_max)), text(rng.randint(48, a_max)),
                                    text(rng.randint(48, a_max)))
        rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        p = tokenizer(prompt)["input_ids"]
        for key in ("chosen", "rejected"):
            full = tokenizer(prompt + rec[key] + tokenizer.eos_token)["input_ids"]
            k = 0
            while k < min(len(p), len(full)) and p[k] == full[k]:
                k += 1
            rec[f"{key}_seq"] = (full[:k], full[k:])  # (prompt ids, answer ids)
        out.append(rec)
    return out


def lmtune_rows(pairs, seq: int):
    from lmtune.data.preference import CHOSEN, REJECTED, pack_units

    units = []
    for rec in pairs:
        unit = []
        for key, role in (("chosen", CHOSEN), ("rejected", REJECTED)):
            prompt, answer = rec[f"{key}_seq"]
            ids = (prompt + answer)[:seq]
            labels = ([-100] * len(prompt) + answer)[:seq]
            unit.append({"input_ids": ids, "labels": labels, "role": role})
        units.append(unit)
    return pack_units(units, 2 * seq, shuffle=False)


# ----------------------------------------------------------------------------- lmtune


def run_lmtune(name, case, pairs, tokenizer, steps, extra):
    import torch

    from lmtune.config import validate
    from lmtune.train.loop import Trainer

    dtype = torch.float32 if case["method"] == "full" else torch.bfloat16
    model = build_model(case["shape"], dtype)
    rows = lmtune_rows(pairs, case["seq"])
    # rows per optimizer step: the rows that hold about PAIRS_PER_STEP pairs
    per_row = sum(len(r["seq_roles"]) // 2 for r in rows) / len(rows)
    accum = max(1, round(PAIRS_PER_STEP / per_row / (extra or {}).get("batch_size", 1)))
    raw = dict(model="random", objective="dpo", beta=BETA, method=case["method"], lora_r=LORA["r"],
               lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, lora_target_modules="all-linear",
               gradient_checkpointing=True, lr=LR, max_norm=1.0, batch_size=1, accumulative_counts=accum,
               max_length=case["seq"], warmup_ratio=0.0, lr_scheduler="constant", mixed_precision="bf16", seed=0,
               max_steps=1000, save_steps=10**6, prompt_template="chatml", precompute_reference=True)
    raw.update(extra or {})
    t = Trainer(validate(raw), "/tmp/lmtune_dpo_bench", model=model, rows=rows, tokenizer=tokenizer)
    t0 = time.perf_counter()
    t.setup()  # the fast path, LoRA, the optimizer and (precompute_reference) the reference log-probs
    sync()
    setup_s = time.perf_counter() - t0
    memory(reset=True)
    stamps, lengths, losses = [], [], []
    for _ in range(steps):
        st = t.state
        order = t._epoch_order(st.epoch)[st.index: st.index + t.rows_per_step]
        step_rows = [t.rows[j] for j in order]
        loss, metrics = t._train_step()
        sync()
        stamps.append(time.perf_counter())
        lengths.append([n for r in step_rows for n in r["seq_lens"]])
        losses.append(round(loss, 5))
    res = _result(name, "lmtune", case, stamps, lengths, losses)
    res.update(fast_path=t.fast.lines(), setup_s=round(setup_s, 1),
               pairs_per_step=sum(len(x) for x in lengths) / 2 / len(lengths))
    del t, model
    return res


def _result(name, stack, case, stamps, lengths, losses):
    dur = stamps[-1] - stamps[0]  # the first step (warm-up) is not timed
    toks = sum(sum(x) for x in lengths[1:])
    n, layers, width, _ = matmul_params(case["shape"])
    per_token = 6 * n if case["method"] == "full" else 4 * n
    attn = sum(sum(x * x for x in step) / 2 * 4 * width * layers * 3 for step in lengths[1:])
    return {"case": name, "stack": stack, "tokens_per_s": toks / dur, "tflops": (per_token * toks + attn) / dur / 1e12,
            "step_s": dur / (len(stamps) - 1), "tokens_per_step": toks / (len(stamps) - 1),
            "peak_alloc_gib": memory()[0], "peak_reserved_gib": memory()[1], "losses": losses}


# ----------------------------------------------------------------------------- TRL


def run_trl(name, case, pairs, tokenizer, steps):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    dtype = torch.float32 if case["method"] == "full" else torch.bfloat16
    model = build_model(case["shape"], dtype)
    peft_config = None
    if case["method"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA)
    n_pairs = steps * PAIRS_PER_STEP
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs[:n_pairs]])
    stamps, counts, training = [], [], []

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync()
            memory(reset=True)
            training.append(True)  # from now on the collator feeds training steps, not the reference precompute

        def on_step_end(self, args, state, control, **kw):
            sync()
            stamps.append(time.perf_counter())

    class Counting(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            if training:
                counts.append(out["attention_mask"].sum(1).tolist())
            return out

    args = DPOConfig(
        output_dir="/tmp/trl_dpo_bench", per_device_train_batch_size=TRL_MICRO,
        gradient_accumulation_steps=PAIRS_PER_STEP // TRL_MICRO, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch_fused", max_grad_norm=1.0,
        logging_steps=10_000, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, max_length=case["seq"],
        precompute_ref_log_probs=True, precompute_ref_batch_size=4 * TRL_MICRO, beta=BETA, loss_type=["sigmoid"],
        use_liger_kernel=cuda(), dataloader_num_workers=0, remove_unused_columns=True, use_cpu=not cuda(),
    )
    # TRL keys its cache of reference log-probs by a SHA-256 of every weight, copied to the CPU (minutes
    # for an 8B model, before training). A fresh process has nothing cached: key by the case instead.
    # Only the cache key changes; what TRL computes and the timed training steps are untouched.
    import trl.trainer.dpo_trainer as trl_dpo

    trl_dpo.hash_module = lambda module: f"gpu_dpo_bench-{name}"
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Stamp()],
                         data_collator=Counting(pad_token_id=tokenizer.pad_token_id, max_length=case["seq"]))
    sync()
    setup_s = time.perf_counter() - t0
    out = trainer.train()
    k = PAIRS_PER_STEP // TRL_MICRO
    if len(counts) != k * steps:
        log(f"trl: {len(counts)} training micro-batches counted, expected {k * steps}; using the last ones")
        counts[:] = counts[-k * steps:]
    lengths = [[n for c in counts[i * k:(i + 1) * k] for n in c] for i in range(steps)]
    res = _result(name, "trl", case, stamps, lengths, [round(out.training_loss, 5)])
    padded = sum(len(c) * max(c) for c in counts)
    res.update(setup_s=round(setup_s, 1), padding_fraction=round(1 - sum(map(sum, counts)) / padded, 3),
               pairs_per_step=PAIRS_PER_STEP)
    del trainer, model
    return res


# ----------------------------------------------------------------------------- driver


def worker(args):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with open(Path(args.out) / f"results_{args.stack}.jsonl", "a") as f:
        for name in [c for c in args.cases.split(",") if c]:
            base, *mods = name.split("+")
            if mods and args.stack != "lmtune":
                continue
            case = CASES[base]
            pairs = make_pairs(tokenizer, args.steps * PAIRS_PER_STEP * 2, case["seq"])
            log(f"{args.stack}: {name}")
            t0 = time.time()
            try:
                if args.stack == "lmtune":
                    r = run_lmtune(name, case, pairs, tokenizer, args.steps,
                                   {k: v for m in mods for k, v in VARIANTS[m].items()})
                else:
                    r = run_trl(name, case, pairs, tokenizer, args.steps)
            except torch.OutOfMemoryError as e:
                r = {"case": name, "stack": args.stack, "error": f"out of memory: {str(e)[:200]}"}
            except Exception as e:  # one broken case must not lose the others' results
                import traceback

                traceback.print_exc()
                r = {"case": name, "stack": args.stack, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            r["wall_s"] = round(time.time() - t0, 1)
            log(json.dumps(r))
            f.write(json.dumps(r) + "\n")
            f.flush()
            gc.collect()
            if cuda():
                torch.cuda.empty_cache()


def report(out: Path, peak: float, device: str) -> str:
    rows = {}
    for p in sorted(out.glob("results_*.jsonl")):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            rows[(r["case"], r["stack"])] = r
    lines = [f"GPU: {device}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; {time.strftime('%Y-%m-%d')}", "",
             "| case | stack | reference | tokens/s | MFU | peak alloc GiB | peak reserved GiB | tokens/step | "
             "padding | setup s | tokens/s ratio | alloc ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = sorted({c for c, _ in rows}, key=lambda c: (list(CASES).index(c.split("+")[0]), c))
    for name in names:
        base = rows.get((name.split("+")[0], "trl"))
        for stack in ("trl", "lmtune"):
            r = rows.get((name, stack))
            if r is None:
                continue
            label = "TRL DPOTrainer" if stack == "trl" else "lmtune"
            ref = "live, adapter off" if "+live" in name else "precomputed"
            if "error" in r:
                lines.append(f"| {name} | {label} | {ref} | {r['error'][:60]} | | | | | | | | |")
                continue
            ratio = alloc = ""
            if stack == "lmtune" and base and "error" not in base:
                ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                alloc = f"{r['peak_alloc_gib'] / base['peak_alloc_gib']:.2f}x"
            lines.append(f"| {name} | {label} | {ref} | {r['tokens_per_s']:.0f} | {100 * r['tflops'] * 1e12 / peak:.1f}% "
                         f"| {r['peak_alloc_gib']} | {r['peak_reserved_gib']} | {r['tokens_per_step']:.0f} | "
                         f"{r.get('padding_fraction', 0):.0%} | {r.get('setup_s', '')} | {ratio} | {alloc} |")
    fast = [r.get("fast_path") for (c, s), r in rows.items() if s == "lmtune" and r.get("fast_path")]
    if fast:
        lines += ["", "lmtune's automatic choices (first case):", ""] + [f"- {x}" for x in fast[0]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="lora-8b-2048,lora-8b-2048+live,full-1.5b-2048,full-1.5b-2048+mb2")
    ap.add_argument("--stacks", default="trl,lmtune")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--stack")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    import torch

    peak = bf16_peak() if cuda() else 1e12
    device = torch.cuda.get_device_name(0) if cuda() else "CPU (smoke test)"
    log(f"bf16 peak {peak / 1e12:.0f} TFLOP/s on {device}")
    for stack in args.stacks.split(","):
        cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--out", str(out), "--cases", args.cases,
               "--steps", str(args.steps), "--tokenizer", args.tokenizer]
        rc = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log(f"{stack} worker exited with {rc}")
    md = report(out, peak, device)
    (out / "RESULTS_dpo.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
