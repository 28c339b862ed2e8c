"""The training loop. Read it top to bottom: setup, train, save.

    trainer = Trainer(cfg, work_dir)
    trainer.setup(resume_from)   # tokenizer, data, model (+LoRA), optimizer, schedule, state
    trainer.train()              # steps, logging, probes, checkpoints, final Hugging Face export

One optimizer step consumes `batch_size × accumulative_counts × world_size` rows. The loss of a
step is the token-level mean over every loss token of that whole step, so accumulation and
process count do not change the result (8 × 1 equals 1 × 8).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmtune.config import Config, check_paths, dump_config
from lmtune.errors import UserError
from lmtune.train import checkpoint as ckpt
from lmtune.train.objectives import count_loss_tokens, flat_batch, loss_sum, to_device
from lmtune.train.schedule import make_scheduler


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step draws from
    index: int = 0  # rows of that epoch already consumed (the data position)
    tokens_seen: int = 0
    history: list = field(default_factory=list)  # [(step, loss)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for, but no CUDA GPU is available", hint="set device = 'auto'")
    return torch.device(name)


def pick_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    mode = cfg.mixed_precision
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


def make_adamw(groups, cfg: Config, device: torch.device):
    """AdamW as the config asks: torch's (fused on GPU), or bitsandbytes' 8-bit / paged variants,
    which keep the optimizer state in 8 bits and/or page it to host memory under pressure."""
    kind = cfg.optimizer
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"optimizer '{kind}' needs bitsandbytes", where=cfg._source,
                        hint="pip install 'lmtune[qlora]', or set optimizer = 'adamw'") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[kind]
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class Trainer:
    def __init__(self, cfg: Config, work_dir: str | Path, dist=None):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        # `dist` describes the process group (rank, world size, wrapping); None = one process.
        from lmtune.train.distributed import SingleProcess

        self.dist = dist or SingleProcess()
        self.state = TrainState()
        self.log_file = None
        self.tb = None

    # ------------------------------------------------------------------ setup
    def setup(self, resume_from: Path | None = None) -> None:
        cfg = self.cfg
        check_paths(cfg)
        seed_everything(cfg.seed)
        self.device = self.dist.device(pick_device(cfg.device))
        self.amp_dtype = pick_precision(cfg, self.device)
        self._setup_tokenizer_and_data()
        self._setup_model()
        self._setup_optimizer()
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        if self.dist.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / "logs").mkdir(exist_ok=True)
            dump_config(cfg, self.work_dir / "config.py")

    def _setup_tokenizer_and_data(self) -> None:
        from lmtune.data.dataset import build_dataset
        from lmtune.data.templates import get_template
        from lmtune.models.loader import load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.template = get_template(cfg.prompt_template, self.tokenizer)
        data = build_dataset(cfg, self.tokenizer, self.template)
        self.rows = data.rows
        self.data_stats = data.stats
        if not self.rows:
            raise UserError("the training data is empty after tokenization", where=cfg._source,
                            hint="run `lmtune data check CONFIG` to see what was skipped and why")
        per_step = cfg.batch_size * cfg.accumulative_counts * self.dist.world_size
        self.rows_per_step = per_step
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.max_epochs * len(self.rows) / per_step))
        self.dist.log(
            f"data: {len(self.rows)} rows ({'packed' if cfg.pack_to_max_length else 'unpacked'}, "
            f"max_length {cfg.max_length}); {per_step} rows per step; {self.total_steps} steps"
        )

    def _setup_model(self) -> None:
        from lmtune.models.loader import load_model

        cfg = self.cfg
        dtype = cfg.torch_dtype
        if dtype == "auto":
            # Master weights in fp32 on CPU (autocast handles bf16 compute); the checkpoint's own
            # dtype on GPU for frozen weights, with trainable LoRA weights upcast below.
            dtype = "float32" if self.device.type == "cpu" or cfg.method == "full" else "auto"
        model = load_model(
            cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle,
            quantization=cfg.quantization, device=str(self.device) if cfg.quantization != "none" else None,
            attn_implementation=None if cfg.attn_implementation == "auto" else cfg.attn_implementation,
        )
        model.config.use_cache = False
        # Attention, fused kernels, checkpointing and QLoRA preparation; prints what it chose and why.
        from lmtune.train import fast_path

        fast = fast_path.setup_base_model(model, cfg, self.device, self.amp_dtype)
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", bias="none",
            )
            model = get_peft_model(model, lora)
            for p in model.parameters():  # trainable adapter weights always in fp32
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        elif cfg.quantization != "none":
            raise UserError("quantized weights cannot be fully fine-tuned", where=cfg._source,
                            hint="use method = 'lora' with quantization (QLoRA), or quantization = 'none'")
        if cfg.quantization == "none":
            model.to(self.device)
        self.fast = fast_path.finish(fast, model, cfg, self.device)
        self.fast.report(self.dist.log)
        self.model = model  # the unwrapped model (peft or plain): what we save
        self.train_model = self.dist.wrap(model, cfg)  # what we call forward/backward on
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        self.dist.log(f"model: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable ({cfg.method}); "
                      f"device {self.device}, precision {self.amp_dtype or torch.float32}")

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for p in self.train_model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = self.dist.make_optimizer(groups, lambda g: make_adamw(g, cfg, self.device))
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, cfg.warmup_ratio, cfg.lr_scheduler,
                                        cfg.min_lr_ratio)

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> list[int]:
        """A permutation of the rows for `epoch`, the same in every process and after a resume."""
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            self._order = cached = (epoch, torch.randperm(len(self.rows), generator=g).tolist())
        return cached[1]

    def _next_step_rows(self) -> list[list[dict]]:
        """Rows of the next optimizer step for this process, as micro-batches."""
        cfg, st = self.cfg, self.state
        picked: list[dict] = []
        while len(picked) < self.rows_per_step:
            order = self._epoch_order(st.epoch)
            take = order[st.index: st.index + self.rows_per_step - len(picked)]
            picked.extend(self.rows[i] for i in take)
            st.index += len(take)
            if st.index >= len(order):
                st.epoch, st.index = st.epoch + 1, 0
        self._step_loss_tokens = count_loss_tokens(picked)
        self._step_tokens = sum(len(r["input_ids"]) for r in picked)
        bs, world, rank = cfg.batch_size, self.dist.world_size, self.dist.rank
        micro = []
        for i in range(cfg.accumulative_counts):
            start = (i * world + rank) * bs
            micro.append(picked[start:start + bs])
        return micro

    # ------------------------------------------------------------------ train
    def train(self) -> Path | None:
        cfg = self.cfg
        self._open_logs()
        if cfg.evaluation_inputs and self.state.step == 0:
            self._probe()
        bar = self._progress()
        t_start, tokens_at_start = time.time(), self.state.tokens_seen
        while self.state.step < self.total_steps:
            loss = self._train_step()
            self.state.step += 1
            step = self.state.step
            if not math.isfinite(loss):
                prev = ckpt.latest_checkpoint(self.work_dir, quiet=True)
                kept = f"the last good checkpoint is {prev}" if prev else "no checkpoint had been saved yet"
                raise UserError(
                    f"the loss became {loss} at step {step}; training stopped and nothing was saved for this "
                    f"step ({kept})",
                    hint="lower lr, enable gradient clipping (max_norm), or check the data of this step; "
                    "resume with --resume auto",
                )
            self.state.history.append((step, loss))
            elapsed = time.time() - t_start
            tok_s = (self.state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
            lr = self.scheduler.get_last_lr()[0]
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
                bar.update(1)
            if step % cfg.logging_steps == 0 or step == self.total_steps:
                self._log({"step": step, "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tok_s, 1),
                           "epoch": round(self.state.epoch + self.state.index / len(self.rows), 4),
                           "tokens_seen": self.state.tokens_seen})
            if cfg.evaluation_freq and step % cfg.evaluation_freq == 0 and step != self.total_steps:
                self._probe()
            if step % cfg.save_steps == 0 or step == self.total_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if cfg.evaluation_inputs:
            self._probe()
        out = self.export_final()
        self._close_logs()
        return out

    def _train_step(self) -> float:
        """One optimizer step over all micro-batches; returns the step's mean token loss."""
        cfg, model = self.cfg, self.train_model
        model.train()
        micro_batches = self._next_step_rows()
        denom = max(1, self._step_loss_tokens)
        total = torch.zeros((), device=self.device)
        for i, rows in enumerate(micro_batches):
            batch = to_device(flat_batch(rows), self.device)
            with self.dist.no_sync(model, last=i == len(micro_batches) - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    s, _ = loss_sum(model, batch, fast=self.fast)
                # Scale so the gradient is that of the mean over the whole global step; the
                # engines average gradients over processes, hence × world_size.
                self.dist.backward(s * (self.dist.world_size / denom), model)
                total += s.detach()
        self.dist.clip_and_step(model, self.optimizer, cfg.max_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.tokens_seen += self._step_tokens
        return self.dist.sum_scalar(total) / denom

    # ------------------------------------------------------------------ probes and logs
    def _probe(self) -> None:
        from lmtune.models.generation import greedy_reply
        from lmtune.models.quant import trainable_layout

        model = self.model
        was_training = model.training
        model.eval()
        model.config.use_cache = True
        answers = []
        # Every process generates (sharded engines gather weights collectively); only the main one
        # prints. trainable_layout: generating must not leave 4-bit layers in bitsandbytes' CPU
        # inference layout, in which LoRA gradients are silently wrong (see models/quant.py).
        with trainable_layout(model):
            for q in self.cfg.evaluation_inputs:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    text, stopped = greedy_reply(model, self.tokenizer, self.template, q, self.cfg.system,
                                                 self.cfg.eval_max_new_tokens)
                answers.append({"question": q, "answer": text, "stopped": stopped})
        model.config.use_cache = False
        if was_training:
            model.train()
        if not self.dist.is_main:
            return
        print(f"\n[lmtune] step {self.state.step}: answers to evaluation_inputs", file=sys.stderr)
        for a in answers:
            print(f"  Q: {a['question']}\n  A: {a['answer']}", file=sys.stderr)
        self._log({"step": self.state.step, "probe": answers}, echo=False)

    def _progress(self):
        if not self.dist.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    def _open_logs(self) -> None:
        if not self.dist.is_main:
            return
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_file = open(logs / "train_log.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(logs / "tensorboard"))
        except ImportError:
            self.tb = None
        self._last_plot = 0.0

    def _log(self, record: dict, echo: bool = True) -> None:
        if not self.dist.is_main or self.log_file is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self.log_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.log_file.flush()
        if "loss" in record:
            if self.tb is not None:
                self.tb.add_scalar("train/loss", record["loss"], record["step"])
                self.tb.add_scalar("train/lr", record["lr"], record["step"])
                self.tb.add_scalar("train/tokens_per_s", record["tokens_per_s"], record["step"])
            if time.time() - self._last_plot > 5 or record["step"] == self.total_steps:
                self._plot()

    def _plot(self) -> None:
        """Loss curve PNG in the work dir (written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.state.history:
            return
        steps, losses = zip(*self.state.history)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.work_dir / ".loss_curve.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.work_dir / "loss_curve.png")
        self._last_plot = time.time()

    def _close_logs(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.dist.trainable_state_dict(self.model)

    def save_checkpoint(self) -> Path | None:
        """Write iter_N atomically (every process takes part; the main process writes)."""
        from safetensors.torch import save_file

        st = self.state
        stage = None
        if self.dist.sharded:
            # Every process writes its part into a staging folder; once all have (barrier), the
            # main process moves the parts into iter_N with the rest, then writes the manifest.
            stage = self.work_dir / f".iter_{st.step}.shards"
            if self.dist.is_main:
                shutil.rmtree(stage, ignore_errors=True)
                stage.mkdir(parents=True)
            self.dist.barrier()
            self.dist.save_shards(self.train_model, self.optimizer, stage)
            self.dist.barrier()
        else:
            weights = self.trainable_state_dict()
            optim_state = self.dist.optimizer_state_dict(self.model, self.optimizer)
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        trainer_state = {"step": st.step, "epoch": st.epoch, "index": st.index, "tokens_seen": st.tokens_seen,
                         "history": st.history, "total_steps": self.total_steps, "method": self.cfg.method}
        if stage is not None:
            writers = {f.name: (lambda p, f=f: os.replace(f, p)) for f in sorted(stage.iterdir()) if f.is_file()}
        else:
            writers = {
                "model.safetensors": lambda p: save_file({k: v.contiguous() for k, v in weights.items()}, str(p)),
                "optimizer.pt": lambda p: torch.save(optim_state, p),
            }
        writers.update({
            "scheduler.pt": lambda p: torch.save(self.scheduler.state_dict(), p),
            "rng.pt": lambda p: torch.save(rng, p),
            "trainer_state.json": lambda p: p.write_text(json.dumps(trainer_state), encoding="utf-8"),
            "config.py": lambda p: dump_config(self.cfg, p),
        })
        try:
            path = ckpt.write_checkpoint(self.work_dir, st.step, writers)
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        ckpt.prune_checkpoints(self.work_dir, self.cfg.save_total_limit)
        self.dist.barrier()
        return path

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        sharded_ckpt = (path / "shards.json").is_file()
        if sharded_ckpt != self.dist.sharded:
            raise UserError(
                f"checkpoint {path} was written {'in shards' if sharded_ckpt else 'whole'}, but this run's "
                f"strategy ({self.cfg.strategy}) {'saves whole' if sharded_ckpt else 'saves in shards'}",
                hint="resume with the strategy it was trained with; `lmtune convert pth_to_hf` reads either kind",
            )
        if not sharded_ckpt:
            weights = load_file(str(path / "model.safetensors"))
            self.dist.load_trainable_state_dict(self.model, weights)
            optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            self.dist.load_optimizer_state_dict(self.model, self.optimizer, optim_state)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if sharded_ckpt:  # after the shared RNG: each process restores its own stream too
            self.dist.load_shards(self.train_model, self.optimizer, path)
        st = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        self.state = TrainState(step=st["step"], epoch=st["epoch"], index=st["index"],
                                tokens_seen=st["tokens_seen"], history=[tuple(h) for h in st["history"]])
        self.dist.log(f"resumed from {path} at step {self.state.step}")

    def export_final(self) -> Path | None:
        """The ready-to-use Hugging Face folder work_dir/hf (adapter or full model)."""
        from lmtune.export import save_trained_model

        full_state = self.dist.full_state_dict_for_export(self.model)
        if not self.dist.is_main:
            return None
        out = self.work_dir / "hf"
        save_trained_model(self.model, self.tokenizer, self.cfg, self.template, out, state_dict=full_state)
        self.dist.log(f"final model written to {out}")
        return out


def run_training(cfg: Config, work_dir: str | Path, resume: str | None = None, dist=None) -> Path | None:
    resume_from = ckpt.resolve_resume(Path(work_dir), resume)
    trainer = Trainer(cfg, work_dir, dist=dist)
    trainer.setup(resume_from)
    return trainer.train()
