"""GPU benchmark: lmtune against the strongest peers, same GPU, same script, same data.

Stacks (each in its own subprocess: liger and Unsloth patch transformers for the whole process,
and each stack's peak memory must be its own):

- hf_defaults  Hugging Face Trainer + PEFT with its defaults: SDPA, each micro-batch padded to its
               longest sample, full logits (for reference).
- hf           the same as a competent user runs it: + `train_sampling_strategy="group_by_length"`
               (samples of similar length share a micro-batch), + `use_liger_kernel=True`.
- trl_pf       TRL `SFTTrainer` with padding-free batches; only where a flash-attention kernel
               is installed (TRL's padding-free needs one); otherwise the row says so.
- unsloth      Unsloth `FastLanguageModel` (+ its `get_peft_model`) trained by TRL's `SFTTrainer`
               as Unsloth patches it, with Unsloth's defaults (its padding-free choice, its
               offloaded gradient checkpointing, its kernels). It loads from a folder, so the
               random model is saved to disk first.
- lmtune       lmtune's own Trainer (`Trainer(cfg, work, model=, rows=)`, then `step()`), every
               fast-path choice on "auto" (attention, loss, kernels, fused LoRA, checkpointing,
               micro-batch size from the memory estimate).
- lmtune_capped  the same under `torch.cuda.set_per_process_memory_fraction` at the lowest peak
               reserved memory of the peers in this run: lmtune's automatic plan has to fit there.

Equal work: randomly initialised models of real shapes; synthetic SFT samples (lengths uniform in
[64, seq], the first quarter prompt without loss); every stack trains on the same samples, `b`
samples per micro-batch and `a` micro-batches per optimizer step (lmtune: the same `b x a` samples
per step, grouped into micro-batches by its own token budget), so every step holds the same number
of samples and, on average, the same real tokens (each row reports its mean). bf16; AdamW fused,
lr 1e-4 constant, clip 1.0; LoRA r=16, alpha 32, dropout 0 on all linear layers; QLoRA: NF4 with
double quantization, bf16 compute. Each stack's own checkpointing choice (HF: on, as needed for
these sizes; Unsloth: its default; lmtune: auto).

Figures: the first two steps are warm-up; the others are timed one by one (CUDA-synchronised), and a row
gives the median tokens/s (real tokens: padding excluded) with its min-max spread. MFU =
(k N tokens + causal attention FLOPs) / time / measured bf16 matmul peak, k = 4 for LoRA/QLoRA
(frozen weights get no weight gradient) and 6 for full fine-tuning; N counts the matmul weights
(embedding excluded, output layer included); recomputation is not counted. Peak allocated and
reserved GiB from the step loop (setup excluded).

    python bench/gpu_bench.py --out DIR [--cases lora-8b-4096,...] [--stacks hf,unsloth,lmtune,...]
                              [--steps 5] [--maxlen]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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

# b: samples per micro-batch, a: micro-batches per optimizer step (every stack).
CASES = {
    "lora-8b-2048": dict(shape="llama3-8b", method="lora", quant="none", seq=2048, b=8, a=2),
    "lora-8b-4096": dict(shape="llama3-8b", method="lora", quant="none", seq=4096, b=4, a=2),
    "qlora-8b-2048": dict(shape="llama3-8b", method="lora", quant="nf4", seq=2048, b=8, a=2),
    "qlora-8b-4096": dict(shape="llama3-8b", method="lora", quant="nf4", seq=4096, b=4, a=2),
    "full-3b-4096": dict(shape="llama3.2-3b", method="full", quant="none", seq=4096, b=2, a=4),
    "lora-8b-8192": dict(shape="llama3-8b", method="lora", quant="none", seq=8192, b=2, a=2),
    "full-1.5b-4096": dict(shape="qwen2.5-1.5b", method="full", quant="none", seq=4096, b=4, a=2),
}
DEFAULT_CASES = "lora-8b-2048,lora-8b-4096,qlora-8b-2048,qlora-8b-4096,full-3b-4096"
STACKS = ["hf_defaults", "hf", "trl_pf", "unsloth", "lmtune", "lmtune_capped"]
LABEL = {"hf_defaults": "HF Trainer + PEFT, defaults", "hf": "HF + length grouping + liger",
         "trl_pf": "TRL SFTTrainer, padding-free", "unsloth": "Unsloth", "lmtune": "lmtune",
         "lmtune_capped": "lmtune, capped at the peers' memory"}
PEERS = ("hf", "trl_pf", "unsloth")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models and data


def model_config(shape: str):
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.use_cache = False
    return cfg


def build_model(shape: str, dtype, quant: str, attn: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    kw = {"attn_implementation": attn} if attn else {}
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.bfloat16 if quant != "none" else dtype,
                                                 **kw)
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


def samples(case: dict, steps: int, seed: int = 1) -> list[dict]:
    """steps x b x a SFT samples: lengths uniform in [64, seq], the first quarter prompt (no loss)."""
    import random

    rng = random.Random(seed)
    vocab = SHAPES[case["shape"]]["vocab_size"]
    out = []
    for _ in range(steps * case["b"] * case["a"]):
        n = rng.randint(64, case["seq"])
        ids = [rng.randrange(vocab) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [-100] * (n // 4) + ids[n // 4:]})
    return out


def matmul_params(shape: str) -> tuple[int, int, int]:
    """(N in matmuls, layers, attention width nh*hd) from the shape."""
    s = SHAPES[shape]
    h, i, L, nh, nkv = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                        s["num_attention_heads"], s["num_key_value_heads"])
    hd = s.get("head_dim", h // nh)
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * i
    return per_layer * L + s["vocab_size"] * h, L, nh * hd


def train_flops(case: dict, lengths: list[int]) -> float:
    n, L, width = matmul_params(case["shape"])
    k = 6 if case["method"] == "full" else 4
    attn = sum(x * x for x in lengths) / 2 * 4 * width * L * 3  # causal: half the scores; fwd + bwd = 3x fwd
    return k * n * sum(lengths) + attn


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


WARMUP = 2  # steps not timed (kernel compilation, allocator growth, Unsloth's lazy patching)


def result(name, stack, case, stamps, tokens, slots, losses, **extra):
    """Per-step figures from the step end times; the first WARMUP steps are not timed."""
    import torch

    steps = []
    for k in range(WARMUP, len(stamps)):
        dt = stamps[k] - stamps[k - 1]
        steps.append({"s": dt, "tokens": tokens[k], "tflops": train_flops(case, tokens[k]) / dt / 1e12})
    tps = [sum(s["tokens"]) / s["s"] for s in steps]
    real = sum(sum(t) for t in tokens[WARMUP:])
    return {"case": name, "stack": stack, "tokens_per_s": statistics.median(tps), "tps_min": min(tps),
            "tps_max": max(tps), "tflops": statistics.median(s["tflops"] for s in steps),
            "tokens_per_step": real / len(steps), "steps_timed": len(steps),
            "padding_fraction": round(1 - real / max(1, sum(slots[WARMUP:])), 3) if slots else 0.0,
            "step_tokens_per_s": [round(x) for x in tps],
            "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()), "losses": losses, **extra}


# ----------------------------------------------------------------------------- lmtune


def lmtune_trainer(model, case, work, rows, extra=None):
    """lmtune's own Trainer, given the random model (in place of a checkpoint on disk) and the rows."""
    from lmtune.config import validate
    from lmtune.train.loop import Trainer

    raw = dict(model="random", method=case["method"], quantization=case["quant"], lora_r=LORA["r"],
               lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, lora_target_modules="all-linear",
               lr=LR, max_norm=1.0, batch_size=case["b"], accumulative_counts=case["a"], max_length=case["seq"],
               warmup_ratio=0.0, lr_scheduler="constant", mixed_precision="bf16", seed=0, max_steps=1000,
               device="cuda", gradient_checkpointing="auto", batch_tokens="auto")
    raw.update(extra or {})
    t = Trainer(validate(raw), work, model=model, rows=rows)
    t.setup()
    return t


def run_lmtune(name, case, steps, extra=None, cap_gib=None, stack="lmtune"):
    import torch

    dtype = torch.float32 if case["method"] == "full" else torch.bfloat16
    model = build_model(case["shape"], dtype, case["quant"])
    if cap_gib:  # after the build (NF4 is quantized from a bf16 model), before lmtune plans its memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    t = lmtune_trainer(model, case, "/tmp/lmtune_bench", samples(case, steps), extra=extra)
    fast = t.fast.lines()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stamps, tokens, losses = [], [], []
    for _ in range(steps):
        losses.append(t.step()[0])
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        tokens.append([len(r["input_ids"]) for r in t.last_step_rows])
    res = result(name, stack, case, stamps, tokens, None, losses, fast_path=fast, cap_gib=cap_gib, extra=extra)
    del t, model
    torch.cuda.set_per_process_memory_fraction(1.0)
    return res


# ----------------------------------------------------------------------------- HF Trainer (+ TRL, Unsloth)


class TokenCounter:
    """Counts the tokens each forward of the model sees (real: attention mask or flat row; slots:
    with padding), so every HF-Trainer-based stack is measured the same way."""

    def __init__(self, model):
        self.real, self.slots, self.lengths = 0, 0, []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not module.training:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            lens = mask.sum(1).tolist()
        else:
            pos = kwargs.get("position_ids")
            if pos is not None and ids.shape[0] == 1:  # a flat padding-free row: samples restart at 0
                starts = (pos[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
                lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
            else:
                lens = [ids.shape[1]] * ids.shape[0]
        self.lengths += [int(x) for x in lens]
        self.slots += ids.numel()

    def take(self):
        out, self.lengths = self.lengths, []
        slots, self.slots = self.slots, 0
        return out, slots


def train_args(case, steps, raw=False, **kw):
    """The TrainingArguments every HF-Trainer-based stack shares (the dict itself when raw)."""
    from transformers import TrainingArguments

    base = dict(output_dir="/tmp/hf_bench", per_device_train_batch_size=case["b"],
                gradient_accumulation_steps=case["a"], max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                warmup_steps=0, bf16=True, optim="adamw_torch_fused", max_grad_norm=1.0, logging_steps=10_000,
                save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True)
    base.update(kw)
    return base if raw else TrainingArguments(**base)


def timed_train(trainer, model, name, stack, case, steps, **extra):
    import torch
    from transformers import TrainerCallback

    counter = TokenCounter(model)
    stamps, tokens, slots = [], [], []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            lens, n = counter.take()
            tokens.append(lens)
            slots.append(n)

    trainer.add_callback(Stamp())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    counter.handle.remove()
    return result(name, stack, case, stamps, tokens, slots, [out.training_loss], **extra)


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
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def run_hf(name, case, steps, competent: bool):
    import torch
    from transformers import Trainer as HFTrainer

    dtype = torch.float32 if case["method"] == "full" else torch.bfloat16
    model = build_model(case["shape"], dtype, case["quant"], attn="sdpa")
    if case["quant"] != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if case["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", target_modules=TARGETS, **LORA))
    extra = dict(train_sampling_strategy="group_by_length", use_liger_kernel=True) if competent else {}
    args = train_args(case, steps, gradient_checkpointing=True, remove_unused_columns=False,
                      gradient_checkpointing_kwargs={"use_reentrant": False}, **extra)
    trainer = HFTrainer(model=model, args=args, train_dataset=samples(case, steps), data_collator=pad_collate)
    res = timed_train(trainer, model, name, "hf" if competent else "hf_defaults", case, steps)
    del trainer, model
    return res


def run_trl_padding_free(name, case, steps):
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return {"case": name, "stack": "trl_pf",
                "error": "not run: TRL's padding-free batches need a flash-attention kernel; none is installed "
                         "(flash-attn has no wheel for this torch/CUDA, hub kernels are unreachable)"}
    raise NotImplementedError("TRL padding-free with flash-attn: add when a kernel is available")


UNSLOTH_DIRS: dict = {}


def unsloth_folder(shape: str) -> str:
    """The random model of `shape` saved as a Hugging Face folder (Unsloth loads from one), with a
    word-level tokenizer of the right vocabulary size."""
    if shape in UNSLOTH_DIRS:
        return UNSLOTH_DIRS[shape]
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    path = f"/tmp/unsloth_model_{shape}"
    t0 = time.time()
    model = build_model(shape, torch.bfloat16, "none")
    model.save_pretrained(path, max_shard_size="20GB")
    del model
    torch.cuda.empty_cache()
    vocab = {f"<t{i}>": i for i in range(SHAPES[shape]["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<t0>")),
                                  bos_token="<t128000>", eos_token="<t128001>", pad_token="<t128004>")
    tok.save_pretrained(path)
    log(f"saved {shape} for Unsloth in {time.time() - t0:.0f} s")
    UNSLOTH_DIRS[shape] = path
    return path


def run_unsloth(name, case, steps):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    if case["method"] != "lora":
        return {"case": name, "stack": "unsloth", "error": "not run: LoRA/QLoRA cases only"}
    path = unsloth_folder(case["shape"])
    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=case["seq"], dtype=torch.bfloat16,
                                                   load_in_4bit=case["quant"] == "nf4")
    model = FastLanguageModel.get_peft_model(model, target_modules=TARGETS, bias="none", random_state=0, **LORA)
    rows = samples(case, steps)
    data = Dataset.from_list([{"input_ids": r["input_ids"],
                               "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows])
    args = SFTConfig(**train_args(case, steps, raw=True), max_length=case["seq"], dataset_num_proc=1,
                     completion_only_loss=True)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=args)
    res = timed_train(trainer, model, name, "unsloth", case, steps,
                      padding_free=bool(getattr(trainer, "padding_free", False)))
    del trainer, model
    return res


# ----------------------------------------------------------------------------- longest sample in a budget


LENGTHS = [2048, 3072, 4096, 6144, 8192, 12288, 16384]


def maxlen_lmtune(budget_gib: float):
    """The longest single QLoRA-8B sample for which one lmtune training step fits in `budget_gib`
    (the cap is set before the model is built: lmtune's automatic plan sees only the budget)."""
    import torch

    case = dict(CASES["qlora-8b-4096"], b=1, a=1, seq=max(LENGTHS))
    total = torch.cuda.get_device_properties(0).total_memory
    vocab = SHAPES[case["shape"]]["vocab_size"]
    model = build_model(case["shape"], torch.bfloat16, "nf4")  # quantized from bf16: built before the cap
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total))
    first = torch.randint(0, vocab, (8,)).tolist()
    t = lmtune_trainer(model, case, "/tmp/lmtune_maxlen", [{"input_ids": first, "labels": first}])
    best, peak, lines = 0, None, t.fast.lines()
    for L in LENGTHS:
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab, (L,)).tolist()
        t.set_rows([{"input_ids": ids, "labels": ids}])
        try:
            t0 = time.perf_counter()
            t.step()
            torch.cuda.synchronize()
            best, peak = L, gib(torch.cuda.max_memory_reserved())
            log(f"lmtune {budget_gib} GiB: {L} ok ({time.perf_counter() - t0:.1f} s, reserved {peak} GiB, "
                f"allocated {gib(torch.cuda.max_memory_allocated())} GiB)")
        except torch.OutOfMemoryError:
            log(f"lmtune {budget_gib} GiB: {L} out of memory")
            t.optimizer.zero_grad(set_to_none=True)
            break
    torch.cuda.set_per_process_memory_fraction(1.0)
    del t, model
    return {"stack": "lmtune", "budget_gib": budget_gib, "longest": best, "capped": best == LENGTHS[-1],
            "peak_reserved_gib": peak, "fast_path": lines}


# ----------------------------------------------------------------------------- driver


def peer_cap(out: Path, name: str) -> float | None:
    """The lowest peak reserved GiB of the peers that ran `name` in this run."""
    peaks = []
    for stack in PEERS:
        p = out / f"results_{stack}.jsonl"
        if p.exists():
            for line in p.read_text().splitlines():
                r = json.loads(line)
                if r.get("case") == name and "error" not in r:
                    peaks.append(r["peak_reserved_gib"])
    return min(peaks) if peaks else None


def worker(args):
    if args.stack.startswith("lmtune"):
        from lmtune.cli import set_allocator_defaults

        set_allocator_defaults()  # what `lmtune train` does first
    if args.stack == "unsloth":
        import unsloth  # noqa: F401  (Unsloth must be imported before transformers)
    import torch

    out = Path(args.out)
    extra = json.loads(args.extra) if args.extra else None
    stack = args.stack + (f"-{args.tag}" if args.tag else "")
    res_path = out / f"results_{stack}.jsonl"
    with open(res_path, "a") as f:
        for name in [c for c in args.cases.split(",") if c]:
            case = CASES[name]
            log(f"{args.stack}: {name}")
            t0 = time.time()
            try:
                if args.stack == "lmtune":
                    r = run_lmtune(name, case, args.steps, extra, stack=stack)
                elif args.stack == "lmtune_capped":
                    cap = peer_cap(out, name)
                    if cap is None:
                        continue
                    r = run_lmtune(name, case, args.steps, extra, cap_gib=cap, stack=stack)
                elif args.stack in ("hf", "hf_defaults"):
                    r = run_hf(name, case, args.steps, competent=args.stack == "hf")
                elif args.stack == "trl_pf":
                    r = run_trl_padding_free(name, case, args.steps)
                else:
                    r = run_unsloth(name, case, args.steps)
            except torch.OutOfMemoryError as e:
                r = {"case": name, "stack": stack, "error": f"out of memory: {str(e)[:160]}"}
                torch.cuda.set_per_process_memory_fraction(1.0)
            r["wall_s"] = round(time.time() - t0, 1)
            log(json.dumps(r))
            f.write(json.dumps(r) + "\n")
            f.flush()
            gc.collect()
            torch.cuda.empty_cache()
        if args.maxlen and stack == "lmtune":
            r = maxlen_lmtune(8.0)
            log(json.dumps(r))
            f.write(json.dumps({"maxlen": r}) + "\n")


def report(out: Path, peak: float, device: str) -> str:
    rows, maxl = {}, []
    for p in sorted(out.glob("results_*.jsonl")):
        for line in p.read_text().splitlines():
            r = json.loads(line)
            if "maxlen" in r:
                maxl.append(r["maxlen"])
            else:
                rows[(r["case"], r["stack"])] = r
    lines = [f"GPU: {device}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; {time.strftime('%Y-%m-%d')}", "",
             "| case | stack | tokens/s median (min-max) | MFU | real tokens/step | padding | peak alloc GiB | "
             "peak reserved GiB | lmtune (/ capped) ÷ this |", "|---|---|---|---|---|---|---|---|---|"]
    stacks = STACKS + sorted({s for _, s in rows} - set(STACKS))
    for name in [c for c in CASES if any(k[0] == c for k in rows)]:
        ours = rows.get((name, "lmtune"))
        for stack in stacks:
            r = rows.get((name, stack))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {LABEL.get(stack, stack)} | {r['error'][:110]} | | | | | | |")
                continue
            ratio = []
            for mine in (ours, rows.get((name, "lmtune_capped"))):
                if mine and "error" not in mine and not stack.startswith("lmtune"):
                    ratio.append(f"{mine['tokens_per_s'] / r['tokens_per_s']:.2f}x speed, "
                                 f"{mine['peak_reserved_gib'] / r['peak_reserved_gib']:.2f}x memory")
            ratio = " / ".join(ratio)
            label = LABEL.get(stack, stack) + (f" ({r['cap_gib']} GiB)" if r.get("cap_gib") else "")
            if stack == "unsloth":
                label += " (padding-free)" if r.get("padding_free") else " (padded)"
            lines.append(
                f"| {name} | {label} | {r['tokens_per_s']:.0f} ({r['tps_min']:.0f}-{r['tps_max']:.0f}) | "
                f"{100 * r['tflops'] * 1e12 / peak:.1f}% | {r['tokens_per_step']:.0f} | {r['padding_fraction']:.0%} | "
                f"{r['peak_alloc_gib']} | {r['peak_reserved_gib']} | {ratio} |")
    for m in maxl:
        lines += ["", f"QLoRA Llama-3-8B, one sample, lmtune within {m['budget_gib']} GiB: longest sample that trains "
                      f"{m['longest'] or 'none'} tokens (peak reserved {m['peak_reserved_gib']} GiB)"]
    for (c, s), r in sorted(rows.items()):
        if s.startswith("lmtune") and r.get("fast_path"):
            lines += ["", f"lmtune's automatic choices, {c} ({s}):", ""] + [f"- {x}" for x in r["fast_path"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--stacks", default="hf,trl_pf,unsloth,lmtune,lmtune_capped")
    ap.add_argument("--defaults-cases", default="lora-8b-4096", help="cases that also run hf_defaults ('' for none)")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement (use 795)")
    ap.add_argument("--steps", type=int, default=5, help=f"optimizer steps per run (the first {WARMUP} not timed)")
    ap.add_argument("--maxlen", action="store_true")
    ap.add_argument("--extra", default="", help="lmtune config overrides (JSON), for variants")
    ap.add_argument("--tag", default="", help="names an lmtune variant's rows (with --extra)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--stack")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    import torch

    peak = 795e12 if args.no_peak else bf16_peak()
    torch.cuda.empty_cache()  # the workers' memory estimates read the free memory
    device = torch.cuda.get_device_name(0)
    log(f"bf16 peak {peak / 1e12:.0f} TFLOP/s on {device}")
    runs = []
    for stack in [s for s in args.stacks.split(",") if s]:
        if stack == "hf" and args.defaults_cases:
            runs.append(("hf_defaults", args.defaults_cases))
        runs.append((stack, args.cases))
    for stack, cases in runs:
        cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--out", str(out), "--cases", cases,
               "--steps", str(args.steps), "--extra", args.extra, "--tag", args.tag] + (["--maxlen"] if args.maxlen else [])
        rc = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log(f"{stack} worker exited with {rc}")
    md = report(out, peak, device)
    (out / "RESULTS_gpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
