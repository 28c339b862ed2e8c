"""GPU benchmark: lmtune against Hugging Face Trainer + PEFT, same GPU, same script.

Randomly initialised models of real shapes (Llama-3-8B, Qwen2.5-1.5B, Llama-3.2-3B), synthetic
token data whose sample lengths are drawn uniformly between 64 and the case's max length, about
the same tokens per optimizer step for both stacks, bf16 autocast, gradient checkpointing on,
AdamW (fused), LoRA r=16 / alpha 32 on all linear layers, no dropout.

- lmtune: its own Trainer, given the random model and the rows (`Trainer(cfg, work, model=,
  rows=)`, then `step()`): packed rows, padding-free varlen attention, fused loss, liger kernels --
  all picked by the "auto" defaults.
- baseline: `transformers.Trainer` + PEFT (+ bitsandbytes NF4 and `prepare_model_for_kbit_training`
  for QLoRA), SDPA attention, each micro-batch padded to its longest sample.

Each stack runs in its own subprocess (liger patches transformers' modules for the whole process;
peak memory must be each stack's own). Reports tokens/s (real tokens, padding excluded), peak
memory (max_memory_allocated and max_memory_reserved), MFU = (6·N·tokens + causal attention
FLOPs) / time / measured bf16 matmul peak, the ratios, and the longest QLoRA-8B sample that trains
in 8 GiB and in the whole GPU.

    python bench/gpu_bench.py --out DIR [--cases lora-8b-2048,...] [--maxlen] [--steps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                         tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "llama3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
                        rms_norm_eps=1e-5),
}

# micro: tokens per micro-batch (lmtune: packed rows; HF: samples padded to the longest).
CASES = {
    "lora-8b-2048": dict(shape="llama3-8b", method="lora", quant="none", seq=2048),
    "lora-8b-8192": dict(shape="llama3-8b", method="lora", quant="none", seq=8192),
    "qlora-8b-2048": dict(shape="llama3-8b", method="lora", quant="nf4", seq=2048),
    "qlora-8b-8192": dict(shape="llama3-8b", method="lora", quant="nf4", seq=8192),
    "full-1.5b-4096": dict(shape="qwen2.5-1.5b", method="full", quant="none", seq=4096),
    "full-3b-4096": dict(shape="llama3.2-3b", method="full", quant="none", seq=4096),
}
MICRO_TOKENS = 16384
HF_ACCUM = 2  # HF: 2 micro-batches of MICRO_TOKENS // seq samples; lmtune: the same tokens in packed rows
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
LR = 1e-4


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models and data


def build_model(shape: str, dtype, quant: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if quant != "none" else dtype)
    if quant == "nf4":
        nf4_quantize(model)
    model.config.use_cache = False
    return model


def nf4_quantize(model):
    """Replace every decoder Linear with a bitsandbytes NF4 Linear4bit (what from_pretrained with
    BitsAndBytesConfig(nf4, double quant, bf16 compute/storage) builds), layer by layer."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if type(mod) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                  quant_storage=torch.bfloat16, device="meta")
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=torch.bfloat16)
            q.weight = q.weight.to("cuda")  # quantizes
            if mod.bias is not None:
                q.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.rsplit(".", 1)[-1], q)
            del mod
        torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True  # what peft looks at to pick its 4-bit LoRA layers


def samples(n: int, seq: int, vocab: int, seed: int):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(64, seq)
        ids = [rng.randrange(vocab) for _ in range(L)]
        # SFT-like: the first quarter is prompt (no loss)
        out.append({"input_ids": ids, "labels": [-100] * (L // 4) + ids[L // 4:]})
    return out


def pack(rows, seq):
    """First-fit packing into rows of at most `seq` tokens (position ids restart per sample)."""
    packed = []
    for r in rows:
        n = len(r["input_ids"])
        row = next((p for p in packed if len(p["input_ids"]) + n <= seq), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            packed.append(row)
        row["input_ids"] += r["input_ids"]
        row["labels"] += r["labels"]
        row["position_ids"] += list(range(n))
    return packed


def matmul_params(shape: str) -> tuple[int, int, int, int]:
    """(N in matmuls, layers, attention width nh*hd, vocab) from the shape."""
    s = SHAPES[shape]
    h, i, L, nh, nkv = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                        s["num_attention_heads"], s["num_key_value_heads"])
    hd = s.get("head_dim", h // nh)
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * i
    return per_layer * L + s["vocab_size"] * h, L, nh * hd, s["vocab_size"]


def train_flops(shape: str, lengths: list[int]) -> float:
    n, L, width, _ = matmul_params(shape)
    attn = sum(x * x for x in lengths) / 2 * 4 * width * L * 3  # causal: half the score matrix; fwd+bwd = 3x
    return 6 * n * sum(lengths) + attn


def bf16_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (start.elapsed_time(end) / 1e3)


def gib(x):
    return round(x / 2**30, 2)


# ----------------------------------------------------------------------------- lmtune


def lmtune_trainer(model, case, work, rows, rows_per_micro, accum, extra=None):
    """lmtune's own Trainer, given the random model (in place of a checkpoint on disk) and the rows."""
    from lmtune.config import validate
    from lmtune.train.loop import Trainer

    raw = dict(model="random", method=case["method"], quantization=case["quant"], lora_r=LORA["r"],
               lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, lora_target_modules="all-linear",
               gradient_checkpointing=True, lr=LR, max_norm=1.0, batch_size=rows_per_micro,
               accumulative_counts=accum, max_length=case["seq"], warmup_ratio=0.0, lr_scheduler="constant",
               mixed_precision="bf16", seed=0, max_steps=1000, device="cuda")
    raw.update(extra or {})
    t = Trainer(validate(raw), work, model=model, rows=rows)
    t.setup()
    return t


VARIANTS = {"offload": {"cpu_offload": True}, "nockpt": {"gradient_checkpointing": False}}


def run_lmtune(name, case, steps, extra=None):
    import torch

    dtype = torch.float32 if case["method"] == "full" else torch.bfloat16
    model = build_model(case["shape"], dtype, case["quant"])
    seq = case["seq"]
    rows_per_micro = max(1, MICRO_TOKENS // seq)
    n_samples = steps * HF_ACCUM * MICRO_TOKENS // seq * 3  # enough that no step wraps an epoch
    rows = pack(samples(n_samples, seq, SHAPES[case["shape"]]["vocab_size"], seed=1), seq)
    t = lmtune_trainer(model, case, "/tmp/lmtune_bench", rows, rows_per_micro, accum=2, extra=extra)
    fast = t.fast.lines()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stamps, lengths, losses = [], [], []
    for _ in range(steps):
        before = t.state.tokens_seen
        losses.append(t.step()[0])
        step_rows = t.last_step_rows
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        lens = []
        for r in step_rows:
            p = r["position_ids"]
            starts = [k for k, v in enumerate(p) if v == 0] + [len(p)]
            lens += [b - a for a, b in zip(starts[:-1], starts[1:])]
        lengths.append(lens)
        assert t.state.tokens_seen - before == sum(lens)
    res = _result(name, "lmtune", case, stamps, lengths, losses)
    res["fast_path"] = fast
    del t, model
    return res


def _result(name, stack, case, stamps, lengths, losses):
    import torch

    # The first step (warm-up: kernel compilation, allocator growth) is not timed.
    dur = stamps[-1] - stamps[0]
    toks = sum(sum(x) for x in lengths[1:])
    flops = sum(train_flops(case["shape"], x) for x in lengths[1:])
    return {"case": name, "stack": stack, "tokens_per_s": toks / dur, "tflops": flops / dur / 1e12,
            "step_s": dur / (len(stamps) - 1), "tokens_per_step": toks / (len(stamps) - 1),
            "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()), "losses": losses}


# ----------------------------------------------------------------------------- HF Trainer + PEFT


def hf_prepare(model, case):
    import torch

    if case["quant"] != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if case["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    del torch
    return model


def pad_collate(batch):
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    pad_collate.counts.append([len(b["input_ids"]) for b in batch])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


pad_collate.counts = []


def run_hf(name, case, steps):
    import torch
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    dtype = torch.float32 if case["method"] == "full" else torch.bfloat16
    model = hf_prepare(build_model(case["shape"], dtype, case["quant"]), case)
    seq = case["seq"]
    b = max(1, MICRO_TOKENS // seq)
    data = samples(steps * HF_ACCUM * b, seq, SHAPES[case["shape"]]["vocab_size"], seed=1)
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir="/tmp/hf_bench", per_device_train_batch_size=b, gradient_accumulation_steps=HF_ACCUM,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, bf16=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch_fused", max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to=[],
        remove_unused_columns=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        dataloader_pin_memory=True,
    )
    pad_collate.counts = []
    trainer = HFTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collate, callbacks=[Stamp()])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    per_step = [sum(sum(c) for c in pad_collate.counts[k * HF_ACCUM:(k + 1) * HF_ACCUM]) for k in range(steps)]
    lengths = [[n for c in pad_collate.counts[k * HF_ACCUM:(k + 1) * HF_ACCUM] for n in c] for k in range(steps)]
    assert sum(per_step) == sum(len(d["input_ids"]) for d in data)
    res = _result(name, "hf", case, stamps, lengths, [out.training_loss])
    padded = sum(len(c) * max(c) for c in pad_collate.counts)
    res["padding_fraction"] = round(1 - sum(per_step) / padded, 3)
    del trainer, model
    return res


# ----------------------------------------------------------------------------- longest sample


LENGTHS = [2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536]
START = {8.0: 2048}  # where the search starts for a budget (else 8192, to save device time)


def maxlen(stack: str, budgets_gib: list[float]):
    """The longest single sample for which one QLoRA-8B training step fits in each memory budget."""
    import torch

    case = dict(CASES["qlora-8b-2048"])
    total = torch.cuda.get_device_properties(0).total_memory
    model = build_model(case["shape"], torch.bfloat16, "nf4")
    vocab = SHAPES[case["shape"]]["vocab_size"]
    if stack == "lmtune":
        first = torch.randint(0, vocab, (8,)).tolist()
        t = lmtune_trainer(model, dict(case, seq=max(LENGTHS)), "/tmp/lmtune_maxlen",
                           [{"input_ids": first, "labels": first}], 1, 1,
                           extra={"cpu_offload": False})  # the default path (offload: see docs/performance.md)

        def step(L):
            ids = torch.randint(0, vocab, (L,)).tolist()
            t.set_rows([{"input_ids": ids, "labels": ids}])
            t.step()
    else:
        model = hf_prepare(model, case)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)

        def step(L):
            ids = torch.randint(0, vocab, (1, L), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    out = []
    for budget in budgets_gib:
        frac = min(1.0, budget * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(frac)
        best, peak = 0, None
        for L in [x for x in LENGTHS if x >= START.get(budget, 8192)]:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                t0 = time.perf_counter()
                step(L)
                torch.cuda.synchronize()
                best, peak = L, gib(torch.cuda.max_memory_reserved())
                log(f"{stack} {budget} GiB: {L} ok ({time.perf_counter() - t0:.1f} s, reserved {peak} GiB)")
            except torch.OutOfMemoryError:
                log(f"{stack} {budget} GiB: {L} out of memory")
                break
            finally:
                if stack == "lmtune":
                    t.optimizer.zero_grad(set_to_none=True)
        out.append({"stack": stack, "budget_gib": budget, "longest": best, "capped": best == LENGTHS[-1],
                    "peak_reserved_gib": peak})
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out


# ----------------------------------------------------------------------------- driver


def worker(args):
    import torch

    res_path = Path(args.out) / f"results_{args.stack}.jsonl"
    with open(res_path, "a") as f:
        for name in [c for c in args.cases.split(",") if c]:
            base, *mods = name.split("+")  # e.g. "lora-8b-2048+offload": an lmtune variant
            case = CASES[base]
            if mods and args.stack != "lmtune":
                continue
            extra = {k: v for m in mods for k, v in VARIANTS[m].items()}
            log(f"{args.stack}: {name}")
            t0 = time.time()
            try:
                if args.stack == "lmtune":
                    r = run_lmtune(name, case, args.steps, extra)
                else:
                    r = run_hf(name, case, args.steps)
            except torch.OutOfMemoryError as e:
                r = {"case": name, "stack": args.stack, "error": f"out of memory: {str(e)[:200]}"}
            r["wall_s"] = round(time.time() - t0, 1)
            log(json.dumps(r))
            f.write(json.dumps(r) + "\n")
            f.flush()
            gc.collect()
            torch.cuda.empty_cache()
        if args.maxlen:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            for r in maxlen(args.stack, [8.0, round(total, 1)]):
                log(json.dumps(r))
                f.write(json.dumps({"maxlen": r}) + "\n")
                f.flush()


def report(out: Path, peak: float, device: str, extra_results=()) -> str:
    rows = {}
    maxl = []
    for p in sorted(out.glob("results_*.jsonl")) + sorted(Path(x) for x in extra_results):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            if "maxlen" in r:
                maxl.append(r["maxlen"])
            else:
                rows[(r["case"], r["stack"])] = r
    lines = [f"GPU: {device}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| case | stack | tokens/s | MFU | peak alloc GiB | peak reserved GiB | padding | "
             "tokens/s ratio | alloc ratio |", "|---|---|---|---|---|---|---|---|---|"]
    names = sorted({c for c, _ in rows}, key=lambda c: (list(CASES).index(c.split("+")[0]), c))
    for name in names:
        base = rows.get((name.split("+")[0], "hf"))
        for stack in ("hf", "lmtune"):
            r = rows.get((name, stack))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {stack} | {r['error'][:60]} | | | | | | |")
                continue
            mfu = r["tflops"] * 1e12 / peak
            ratio = alloc = ""
            if stack == "lmtune" and base and "error" not in base:
                ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                alloc = f"{r['peak_alloc_gib'] / base['peak_alloc_gib']:.2f}x"
            lines.append(f"| {name} | {'HF Trainer + PEFT' if stack == 'hf' else 'lmtune'} | "
                         f"{r['tokens_per_s']:.0f} | {100 * mfu:.1f}% | {r['peak_alloc_gib']} | "
                         f"{r['peak_reserved_gib']} | {r.get('padding_fraction', 0):.0%} | {ratio} | {alloc} |")
    if maxl:
        lines += ["", "Longest QLoRA Llama-3-8B sample that trains (one full step):", "",
                  "| memory budget | stack | longest sample (tokens) | peak reserved GiB |", "|---|---|---|---|"]
        for m in maxl:
            longest = f"≥ {m['longest']} (largest tried)" if m["capped"] else str(m["longest"] or "none")
            lines.append(f"| {m['budget_gib']} GiB | {'HF Trainer + PEFT' if m['stack'] == 'hf' else 'lmtune'} | "
                         f"{longest} | {m['peak_reserved_gib']} |")
    fast = [r.get("fast_path") for (c, s), r in rows.items() if s == "lmtune" and r.get("fast_path")]
    if fast:
        lines += ["", "lmtune's automatic choices (first case):", ""] + [f"- {x}" for x in fast[0]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--stacks", default="hf,lmtune")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--maxlen", action="store_true")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--stack")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    import torch

    peak = bf16_peak()
    device = torch.cuda.get_device_name(0)
    log(f"bf16 peak {peak / 1e12:.0f} TFLOP/s on {device}")
    for stack in args.stacks.split(","):
        cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--out", str(out), "--cases", args.cases,
               "--steps", str(args.steps)] + (["--maxlen"] if args.maxlen else [])
        rc = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log(f"{stack} worker exited with {rc}")
    md = report(out, peak, device)
    (out / "RESULTS_gpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
