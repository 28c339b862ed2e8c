"""GPU checks for QLoRA and the scaling engines; prints a markdown table.

    python bench/gpu_distributed.py --tokenizer PATH [--out DIR] [--skip-8b]

1. QLoRA (NF4, double quant, bf16 compute, LoRA r=16 on all linear layers, gradient
   checkpointing) through lmtune's Trainer on a randomly initialised Llama-3-8B-shaped model,
   with an in-training chat probe between steps; peak GPU memory and step time.
2. Full fine-tuning of a ~1.5B Llama-shaped model on one GPU with FSDP2 (bf16 MixedPrecisionPolicy),
   DeepSpeed ZeRO-2 and ZeRO-3 (each a process group of one), including a sharded checkpoint
   save and the final Hugging Face export; and 8-bit LoRA on the same model.

Random weights: the losses say nothing about quality, only that steps run; memory and time are
what this measures. Needs: torch with CUDA, transformers, peft, bitsandbytes, deepspeed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROWS: list[dict] = []


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def make_model(folder: Path, tokenizer_dir: str, **shape) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    t0 = time.time()
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, **shape)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    log(f"random model {n / 1e9:.2f}B params written to {folder} in {time.time() - t0:.0f} s")
    return folder


def write_data(path: Path, n=64) -> Path:
    words = "the quick brown fox jumps over the lazy dog while a model learns to answer questions".split()
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(words[(i + k) % len(words)] for k in range(60))
            a = " ".join(words[(3 * i + k) % len(words)] for k in range(300))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {q}"},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def write_cfg(path: Path, **kw) -> Path:
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in kw.items()) + "\n")
    return path


def run_case(name: str, cfg_path: Path, work: Path, dist=None, note: str = "") -> None:
    from lmtune.config import load_config
    from lmtune.train.loop import Trainer

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        cfg = load_config(str(cfg_path))
        trainer = Trainer(cfg, work, dist=dist)
        trainer.setup()
        setup_s = time.time() - t0
        t1 = time.time()
        trainer.train()
        torch.cuda.synchronize()
        total_s = time.time() - t1
        recs = [json.loads(x) for x in (work / "logs/train_log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if "loss" in r]
        tok_s = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
        probes = [r for r in recs if "probe" in r]
        peak = torch.cuda.max_memory_allocated() / 2**30
        ckpts = sorted(p.name for p in work.glob("iter_*"))
        ROWS.append(dict(case=name, steps=len(losses), first_loss=losses[0], last_loss=losses[-1],
                         tok_s=tok_s[-1], peak_gib=round(peak, 2), setup_s=round(setup_s, 1),
                         train_s=round(total_s, 1), probes=len(probes), ckpt=",".join(ckpts) or "-",
                         hf=(work / "hf").is_dir(), note=note))
        log(f"{name}: {ROWS[-1]}")
        del trainer
    except Exception as e:  # keep going: the table says what failed
        traceback.print_exc()
        ROWS.append(dict(case=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
    gc.collect()
    torch.cuda.empty_cache()


def table() -> str:
    head = "| case | steps | loss first → last | tokens/s | peak GPU GiB | setup s | train s | probes | checkpoint | HF export | note |"
    lines = [head, "|" + "---|" * 11]
    for r in ROWS:
        if "error" in r:
            lines.append(f"| {r['case']} | FAILED: {r['error']} |" + " |" * 9)
            continue
        lines.append(f"| {r['case']} | {r['steps']} | {r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['tok_s']:.0f} | "
                     f"{r['peak_gib']} | {r['setup_s']} | {r['train_s']} | {r['probes']} | {r['ckpt']} | "
                     f"{'yes' if r['hf'] else 'no'} | {r['note']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--root", default="/tmp/lmtune_gpu")
    ap.add_argument("--out", default=None, help="also write the table and rows here")
    ap.add_argument("--cases", default="qlora8b,fsdp2,zero2,zero3,int8",
                    help="comma-separated subset of qlora8b,fsdp2,zero2,zero3,int8")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    import bitsandbytes
    import deepspeed
    import peft
    import transformers

    dev = torch.cuda.get_device_name(0)
    log(f"{dev}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, deepspeed {deepspeed.__version__}")
    data = write_data(root / "data.jsonl")
    common = dict(datasets=[str(data)], max_length=2048, pack_to_max_length=True, batch_size=1,
                  accumulative_counts=1, warmup_ratio=0.0, lr=1e-4, logging_steps=1, save_total_limit=0,
                  mixed_precision="bf16", seed=0)

    def flush():
        text = table()
        print(text, flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "table.md").write_text(f"{dev}, {time.strftime('%Y-%m-%d')}\n\n{text}\n")
            (Path(args.out) / "rows.json").write_text(json.dumps(ROWS, indent=1))

    cases = set(args.cases.split(","))
    if "qlora8b" in cases:
        m8 = make_model(root / "llama3_8b_random", args.tokenizer, vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8)
        cfg = write_cfg(root / "qlora8b.py", model=str(m8), method="lora", quantization="nf4", lora_r=16,
                        lora_alpha=32, gradient_checkpointing=True, max_steps=6, save_steps=6,
                        evaluation_inputs=["Who are you?"], evaluation_freq=3, eval_max_new_tokens=8, **common)
        run_case("QLoRA NF4, Llama-3-8B shape, 2048 tok/step, GC", cfg, root / "w_qlora8b",
                 note="probe at steps 0, 3, 6")
        flush()
        import shutil

        shutil.rmtree(m8, ignore_errors=True)

    m1 = make_model(root / "llama_1b_random", args.tokenizer, vocab_size=128256, hidden_size=2048,
                    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    from lmtune.train.strategies.deepspeed import DeepSpeedStrategy
    from lmtune.train.strategies.fsdp2 import FSDP2Strategy

    if "int8" in cases:
        cfg = write_cfg(root / "int8.py", model=str(m1), method="lora", quantization="int8", max_steps=3,
                        save_steps=100, **common)
        run_case("8-bit LoRA, 1.5B", cfg, root / "w_int8")
        flush()
    from lmtune.config import load_config

    for key, name, extra in [
        ("fsdp2", "FSDP2 (1 GPU), full FT 1.5B, bf16 MP", dict(strategy="fsdp2")),
        ("zero2", "DeepSpeed ZeRO-2 (1 GPU), full FT 1.5B, bf16", dict(strategy="deepspeed", deepspeed="zero2")),
        ("zero3", "DeepSpeed ZeRO-3 (1 GPU), full FT 1.5B, bf16", dict(strategy="deepspeed", deepspeed="zero3")),
    ]:
        if key not in cases:
            continue
        cfg = write_cfg(root / f"{key}.py", model=str(m1), method="full", max_steps=4, save_steps=4, **extra,
                        **common)
        c = load_config(str(cfg))
        try:
            engine = FSDP2Strategy(c) if key == "fsdp2" else DeepSpeedStrategy(c)
        except Exception as e:
            ROWS.append(dict(case=name, error=f"{type(e).__name__}: {e}"))
            continue
        run_case(name, cfg, root / f"w_{key}", dist=engine, note="sharded checkpoint + HF export")
        del engine  # (ZeRO-3's HfDeepSpeedConfig lives as long as its engine)
        flush()
        import shutil

        shutil.rmtree(root / f"w_{key}", ignore_errors=True)  # a 1.5B full-FT checkpoint is ~24 GB
    return 0


if __name__ == "__main__":
    sys.exit(main())
