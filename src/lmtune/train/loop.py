"""The training loop. Read it top to bottom: setup, train, save.

    trainer = Trainer(cfg, work_dir)
    trainer.setup(resume_from)   # tokenizer, data, model (+LoRA), objective, optimizer, schedule, state
    trainer.train()              # steps, logging, probes, checkpoints, final Hugging Face export

The Trainer can be given its parts instead of building them from the config (benchmarks and tests
do): `Trainer(cfg, work_dir, model=base_model, rows=rows, objective=obj, tokenizer=tok)`; a given
`model` is the base model before adapters (the Trainer adds LoRA and the fast path).

One optimizer step consumes `batch_size × accumulative_counts × world_size` rows (micro-batches of
`batch_size` rows, or of up to `batch_tokens` tokens). The step's loss is the objective's sum over
the whole step divided by its count (loss tokens for SFT, pairs for DPO), so the grouping into
micro-batches and processes does not change the result.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmtune.config import Config, check_paths, dump_config
from lmtune.errors import UserError
from lmtune.train import checkpoint as ckpt, evaluate
from lmtune.train.batch import micro_batches, to_device
from lmtune.train.objectives import Forward, make_objective
from lmtune.train.run_identity import check_resume, prepare_work_dir, run_identity
from lmtune.train.run_log import RunLog
from lmtune.train.runtime import make_optimizer, param_groups, pick_device, pick_precision, seed_everything
from lmtune.train.schedule import lr_lambda, make_scheduler
from lmtune.train.strategies import SingleProcess


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step draws from
    index: int = 0  # rows of that epoch already consumed (the data position)
    tokens_seen: int = 0
    history: list = field(default_factory=list)  # [(step, loss)]
    metrics: dict = field(default_factory=dict)  # {name: [(step, value)]} from the objective


class Trainer:
    def __init__(self, cfg: Config, work_dir: str | Path, dist=None, *, model=None, rows=None, objective=None,
                 tokenizer=None, template=None, model_kind=None, val_rows=None):
        from lmtune.models.kinds import model_kind as kind_for

        self.cfg = cfg
        self.work_dir = Path(work_dir)
        # `dist`: the strategy (process group, wrapping, checkpoint I/O); None = one process.
        self.dist = dist or SingleProcess()
        self.io = self.dist.state  # checkpoint I/O and export gathering
        self.kind = model_kind or kind_for(cfg)
        self.model, self.rows, self.objective, self.val_rows = model, rows, objective, val_rows
        self.tokenizer, self.template = tokenizer, template
        self.state = TrainState()
        self.log = RunLog(self.work_dir, enabled=self.dist.is_main)

    # ------------------------------------------------------------------ setup
    def setup(self, resume_from: Path | None = None) -> None:
        cfg = self.cfg
        check_paths(cfg, data=self.rows is None, models=self.model is None)
        seed_everything(cfg.seed)
        self.device = self.dist.device(pick_device(cfg.device))
        self.amp_dtype = pick_precision(cfg, self.device)
        self.dist.setup_precision(self.amp_dtype, self.device)
        self._setup_tokenizer_and_data()
        self._setup_model()
        self.objective = self.objective or make_objective(cfg, kind=self.kind)
        self._setup_optimizer()
        self.identity = run_identity(cfg, self.rows, self.rows_per_step, self.dist.world_size, self.dist.name)
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        self.objective.setup(self)
        if self.dist.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / "logs").mkdir(exist_ok=True)
            dump_config(cfg, self.work_dir / "config.py")

    def _setup_tokenizer_and_data(self) -> None:
        from lmtune.data.templates import get_template

        cfg = self.cfg
        if self.tokenizer is None and self.rows is None:
            self.tokenizer = self.kind.load_tokenizer(cfg)
        if self.template is None and self.tokenizer is not None:
            self.template = get_template(cfg.prompt_template, self.tokenizer)
        self.data_stats = {}
        if self.rows is None:
            from lmtune.data.build import build_training_data

            data = build_training_data(cfg, self.tokenizer, self.template)
            self.rows, self.data_stats = data.rows, data.stats
            self.val_rows = getattr(data, "val_rows", None)
        if not self.rows:
            raise UserError("the training data is empty after tokenization", where=cfg._source,
                            hint="run `lmtune data check CONFIG` to see what was skipped and why")
        self.rows_per_step = per_step = cfg.batch_size * cfg.accumulative_counts * self.dist.world_size
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.max_epochs * len(self.rows) / per_step))
        self.dist.log(f"data: {len(self.rows)} rows ({'packed' if cfg.pack_to_max_length else 'unpacked'}, "
                      f"max_length {cfg.max_length}); {per_step} rows per step; {self.total_steps} steps")

    def _setup_model(self) -> None:
        from lmtune.train import fast_path

        cfg = self.cfg
        model = self.model if self.model is not None else self.kind.load(cfg, self.device)
        model.config.use_cache = False
        # Attention, fused kernels, checkpointing and QLoRA preparation; prints what it chose and why.
        fast = fast_path.setup_base_model(model, cfg, self.device, self.amp_dtype)
        if cfg.method == "lora":
            model = self.kind.add_lora(model, cfg, custom_modules=fast.lora_modules)
            for p in model.parameters():  # trainable adapter weights always in fp32
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        elif cfg.quantization != "none":
            raise UserError("quantized weights cannot be fully fine-tuned", where=cfg._source,
                            hint="use method = 'lora' with quantization (QLoRA), or quantization = 'none'")
        if cfg.quantization == "none":
            model.to(self.device)
        self.fast = fast_path.finish(fast, model, cfg, self.device, self.amp_dtype)
        self.fast.report(self.dist.log)
        self.forward = Forward(fast=self.fast, kind=self.kind)
        self.model = model  # the unwrapped model (peft or plain): what we save
        self.train_model = self.dist.wrap(model, cfg)  # what we call forward/backward on
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        self.dist.log(f"model: {n_all / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable ({cfg.method}); "
                      f"device {self.device}, precision {self.amp_dtype or torch.float32}")

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        groups = param_groups(self.train_model.parameters(), cfg.weight_decay)
        self.optimizer = self.dist.make_optimizer(groups, lambda g: make_optimizer(g, cfg, self.device))
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, cfg.warmup_ratio, cfg.lr_scheduler, cfg.min_lr_ratio)

    # ------------------------------------------------------------------ data order
    def set_rows(self, rows) -> None:
        """Train on other rows from the start of an epoch (benchmarks probing sizes use it)."""
        self.rows, self._order = rows, None
        self.state.epoch = self.state.index = 0

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
        self.last_step_rows = picked
        self._step_count = self.objective.count(picked)
        self._step_tokens = sum(len(r["input_ids"]) for r in picked)
        return micro_batches(picked, cfg.batch_size, cfg.accumulative_counts, self.dist.world_size, self.dist.rank,
                             self.fast.batch_tokens)

    # ------------------------------------------------------------------ train
    def train(self) -> Path | None:
        cfg = self.cfg
        self.log.open()
        # A record without "loss": where this (possibly resumed) run starts and how far it goes,
        # so a watcher (the webui) can show progress before the first step is done.
        self.log.write({"step": self.state.step, "total_steps": self.total_steps})
        if self.state.step == 0:
            self._probe()
        bar = self._progress()
        t_start, tokens_at_start = time.time(), self.state.tokens_seen
        while self.state.step < self.total_steps:
            loss, metrics = self.step()
            step = self.state.step
            if not math.isfinite(loss):
                raise ckpt.diverged(self.work_dir, loss, step)
            elapsed = time.time() - t_start
            tok_s = (self.state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
            lr = self.scheduler.get_last_lr()[0]
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
                bar.update(1)
            if step % cfg.logging_steps == 0 or step == self.total_steps:
                self.log.write({"step": step, "loss": round(loss, 6), **{k: round(v, 6) for k, v in metrics.items()},
                                "lr": lr, "tokens_per_s": round(tok_s, 1),
                                "epoch": round(self.state.epoch + self.state.index / len(self.rows), 4),
                                "tokens_seen": self.state.tokens_seen})
                self.log.plot(self.state.history, self.state.metrics, force=step == self.total_steps)
            if cfg.evaluation_freq and step % cfg.evaluation_freq == 0 and step != self.total_steps:
                self._probe()
            if not evaluate.validate_if_due(self) and (step % cfg.save_steps == 0 or step == self.total_steps):
                self.save_checkpoint()  # (validation, first, may just have saved this step as the new best)
        if bar is not None:
            bar.close()
        self._probe()
        out = self.export_final()
        self.log.close()
        return out

    def step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step over all micro-batches (no logging, probes or saving); returns the
        step's mean loss and metrics. `last_step_rows` holds the rows it consumed."""
        cfg, model = self.cfg, self.train_model
        model.train()
        micros = self._next_step_rows()
        denom = max(1, self._step_count)  # over the whole global step (every process picked all its rows)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        for i, rows in enumerate(micros):
            batch = to_device(self.objective.make_batch(rows), self.device)
            with self.dist.no_sync(model, last=i == len(micros) - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    s, metrics = self.objective.loss(model, batch, self.forward)
                # Scale so the gradient is that of the mean over the whole global step; the
                # strategies average gradients over processes, hence × world_size.
                self.dist.backward(s * (self.dist.world_size / denom), model)
                total += s.detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
        self.dist.clip_and_step(model, self.optimizer, cfg.max_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.tokens_seen += self._step_tokens
        metrics_out = {}
        if sums:
            names = sorted(sums)
            values = self.dist.sum_tensor(torch.stack([sums[k].reshape(()) for k in names])).tolist()
            metrics_out = {k: v / denom for k, v in zip(names, values)}
        loss = self.dist.sum_scalar(total) / denom
        self.state.step += 1
        if math.isfinite(loss):
            self.state.history.append((self.state.step, loss))
            for name, value in metrics_out.items():
                self.state.metrics.setdefault(name, []).append((self.state.step, value))
        return loss, metrics_out

    # ------------------------------------------------------------------ probes and progress
    def _probe(self) -> None:
        from lmtune.train.probes import probe_answers

        if not self.cfg.evaluation_inputs:  # every probe point asks here: nothing to ask, nothing printed
            return
        answers = probe_answers(self.model, self.tokenizer, self.template, self.cfg, self.device, self.amp_dtype)
        if not self.dist.is_main:
            return
        print(f"\n[lmtune] step {self.state.step}: answers to evaluation_inputs", file=sys.stderr)
        for a in answers:
            print(f"  Q: {a['question']}\n  A: {a['answer']}", file=sys.stderr)
        self.log.write({"step": self.state.step, "probe": answers})

    def _progress(self):
        if not self.dist.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write iter_N atomically (every process takes part; the main process writes)."""
        from safetensors.torch import save_file

        st = self.state
        stage = None
        if self.io.sharded:
            # Every process writes its part into a staging folder; once all have (barrier), the
            # main process moves the parts into iter_N with the rest, then writes the manifest.
            stage = self.work_dir / f".iter_{st.step}.shards"
            if self.dist.is_main:
                shutil.rmtree(stage, ignore_errors=True)
                stage.mkdir(parents=True)
            self.dist.barrier()
            self.io.save_shards(self.train_model, self.optimizer, stage)
            self.dist.barrier()
        else:
            weights = self.io.trainable_state_dict(self.model)
            optim_state = self.io.optimizer_state_dict(self.model, self.optimizer)
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        # Plain tensors and lists only: read back with weights_only=True (no pickle runs on load).
        rng = {"torch": torch.get_rng_state(), "python": ckpt.python_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        trainer_state = {"step": st.step, "epoch": st.epoch, "index": st.index, "tokens_seen": st.tokens_seen,
                         "history": st.history, "metrics": st.metrics, "total_steps": self.total_steps,
                         "method": self.cfg.method, "run": self.identity,
                         "grad_scaler": self.dist.scaler.state_dict() if self.dist.scaler is not None else None}
        if stage is not None:
            writers = {f.name: (lambda p, f=f: f.replace(p)) for f in sorted(stage.iterdir()) if f.is_file()}
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

        st = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        cfg = self.cfg
        sharded_ckpt = ckpt.is_sharded_checkpoint(path)
        if sharded_ckpt != self.io.sharded:
            raise UserError(
                f"checkpoint {path} was written {'in shards' if sharded_ckpt else 'whole'}, but this run's "
                f"strategy ({cfg.strategy}) {'saves whole' if sharded_ckpt else 'saves in shards'}",
                hint="resume with the strategy it was trained with; `lmtune convert pth_to_hf` reads either kind",
            )
        check_resume(st.get("run") or {}, self.identity, st.get("total_steps", 0), self.total_steps, st["step"],
                     lambda total: cfg.lr * lr_lambda(st["step"], total, int(round(total * cfg.warmup_ratio)),
                                                      cfg.lr_scheduler, cfg.min_lr_ratio),
                     sharded=sharded_ckpt, log=self.dist.log)
        if not sharded_ckpt:
            self.io.load_trainable_state_dict(self.model, load_file(str(path / "model.safetensors")))
            optim_state = ckpt.load_plain(path / "optimizer.pt", map_location="cpu")
            self.io.load_optimizer_state_dict(self.model, self.optimizer, optim_state)
        self.scheduler.load_state_dict(ckpt.load_plain(path / "scheduler.pt"))
        rng = ckpt.load_plain(path / "rng.pt")
        torch.set_rng_state(rng["torch"])
        random.setstate(ckpt.python_rng_tuple(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if sharded_ckpt:  # after the shared RNG: each process restores its own stream too
            self.io.load_shards(self.train_model, self.optimizer, path)
        if st.get("grad_scaler") and self.dist.scaler is not None:
            self.dist.scaler.load_state_dict(st["grad_scaler"])
        self.state = TrainState(step=st["step"], epoch=st["epoch"], index=st["index"],
                                tokens_seen=st["tokens_seen"], history=[tuple(h) for h in st["history"]],
                                metrics={k: [tuple(x) for x in v] for k, v in (st.get("metrics") or {}).items()})
        self.resumed_from = path
        self.dist.log(f"resumed from {path} at step {self.state.step}")

    def export_final(self) -> Path | None:
        """The ready-to-use Hugging Face folder work_dir/hf (adapter or full model)."""
        from lmtune.export.hf import save_trained_model

        full_state = self.io.full_state_dict_for_export(self.model)
        if not self.dist.is_main:
            return None
        if self.tokenizer is None:
            raise UserError("the final Hugging Face folder needs a tokenizer; this Trainer was given rows without one",
                            hint="pass tokenizer= to the Trainer")
        out = self.work_dir / "hf"
        save_trained_model(self.model, self.tokenizer, self.cfg, self.template, out, state_dict=full_state)
        self.dist.log(f"final model written to {out}")
        return out


def run_training(cfg: Config, work_dir: str | Path, resume: str | None = None, dist=None,
                 overwrite: bool = False) -> Path | None:
    dist = dist or SingleProcess()
    # Only the main process removes a previous run (--overwrite); the others wait for it.
    resume_from = prepare_work_dir(Path(work_dir), resume, overwrite, log=dist.log, remove=dist.is_main)
    dist.barrier()
    from lmtune.export.hf import check_hf_out

    check_hf_out(Path(work_dir) / "hf")  # a resumed run's hf/ edited by the user: refuse now, not at the end
    trainer = Trainer(cfg, work_dir, dist=dist)
    trainer.setup(resume_from)
    return trainer.train()
