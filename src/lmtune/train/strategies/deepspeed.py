"""DeepSpeed ZeRO stage 1/2/3 (optionally offloading to CPU), driven by the lmtune loop: lmtune
builds the optimizer and schedule; DeepSpeed partitions, reduces and steps. Checkpoints are
DeepSpeed's own files (rank 0 the module, every rank its optimizer partition)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from lmtune.errors import UserError
from lmtune.train.runtime import import_deepspeed
from lmtune.train.strategies.process_group import ProcessGroupStrategy, ShardedState

DEEPSPEED_NAMES = {
    "zero1": "zero1", "zero2": "zero2", "zero2_offload": "zero2_offload", "zero3": "zero3",
    "zero3_offload": "zero3_offload",
}
TEMPLATE_DIR = Path(__file__).parent.parent / "deepspeed_configs"  # src/lmtune/train/deepspeed_configs


def deepspeed_template(name_or_path: str) -> dict:
    """A built-in template by name (deepspeed_zero2 or zero2 ...) or a user's JSON file."""
    key = name_or_path[len("deepspeed_"):] if name_or_path.startswith("deepspeed_") else name_or_path
    if key in DEEPSPEED_NAMES:
        return json.loads((TEMPLATE_DIR / f"{DEEPSPEED_NAMES[key]}.json").read_text(encoding="utf-8"))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        names = ", ".join(f"deepspeed_{n}" for n in DEEPSPEED_NAMES)
        raise UserError(f"--deepspeed '{name_or_path}' is neither a built-in name nor a JSON file",
                        hint=f"use one of {names} (short names like zero2 work too), or a path to a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config is not valid JSON: {e}", where=str(path)) from None


def deepspeed_config(cfg, world_size: int, amp_dtype) -> tuple[dict, list[str]]:
    """The DeepSpeed config: the template plus what the lmtune config decides (batch, accumulation,
    clipping, precision). Returns it with notes on the template values that were overridden."""
    ds = deepspeed_template(cfg.deepspeed or "zero2")
    notes = []
    ours = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.accumulative_counts,
        "train_batch_size": cfg.batch_size * cfg.accumulative_counts * world_size,
        "gradient_clipping": float(cfg.max_norm),
    }
    for key, value in ours.items():
        if key in ds and ds[key] not in ("auto", value):
            notes.append(f"{key}: {ds[key]} in the DeepSpeed JSON ignored; the lmtune config gives {value}")
        ds[key] = value
    for key, want in (("bf16", amp_dtype == torch.bfloat16), ("fp16", amp_dtype == torch.float16)):
        section = dict(ds.get(key) or {})
        if section.get("enabled") not in ("auto", None, want):
            notes.append(f"{key}.enabled: {section['enabled']} in the DeepSpeed JSON ignored; "
                         f"mixed_precision = {cfg.mixed_precision!r} decides ({want})")
        section["enabled"] = want
        ds[key] = section
    for key in ("optimizer", "scheduler"):
        if key in ds:
            notes.append(f"the '{key}' section of the DeepSpeed JSON is ignored: lmtune's lr, betas, "
                         "weight_decay, lr_scheduler and warmup_ratio apply")
            del ds[key]
    zero = ds.setdefault("zero_optimization", {})
    for k, v in list(zero.items()):
        if v == "auto":  # bucket sizes etc.: DeepSpeed's defaults
            del zero[k]
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(section), dict) and not torch.cuda.is_available():
            zero[section]["pin_memory"] = False  # pinned memory needs CUDA
    ds.setdefault("steps_per_print", 10**9)
    # lmtune builds the optimizer (AdamW, 8-bit AdamW or SGD); ZeRO partitions any torch optimizer.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("wall_clock_breakdown", False)
    if zero.get("offload_optimizer"):
        # lmtune builds the optimizer (DeepSpeedCPUAdam when it can be built, else torch AdamW).
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds, notes


class _ThroughEngine(torch.nn.Module):
    """The model as the loop sees it under DeepSpeed: parameters of the model, forward of the engine."""

    def __init__(self, model, owner):
        super().__init__()
        self.module = model
        object.__setattr__(self, "_owner", owner)  # not a submodule

    def forward(self, *args, **kwargs):
        return self._owner.engine(*args, **kwargs)


class DeepSpeedStrategy(ProcessGroupStrategy):
    """DeepSpeed ZeRO stage 1/2/3 (optionally offloading to CPU), driven by the lmtune loop:
    lmtune builds the optimizer and schedule; DeepSpeed partitions, reduces and steps."""

    name = "deepspeed"
    sharded = True

    def __init__(self, cfg):
        self.deepspeed = import_deepspeed()
        super().__init__(cfg)
        self.ds_config, notes = deepspeed_config(cfg, self.world_size, self.amp_dtype())
        self.state = DeepSpeedState(self)
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        for n in notes:
            self.log(f"deepspeed: {n}")
        self.engine = None
        self._model = None

    def setup_precision(self, amp_dtype, device: torch.device) -> None:
        pass  # fp16: DeepSpeed's own dynamic loss scaling (its fp16 section is enabled)

    def wrap(self, model, cfg):
        # deepspeed.initialize needs the optimizer, which the loop builds after wrapping: hand the
        # loop a module whose forward goes through the DeepSpeed engine once make_optimizer made it
        # (the engine's forward does ZeRO's per-micro-batch bookkeeping).
        self._model = model
        return _ThroughEngine(model, self)

    def make_optimizer(self, groups, factory):
        zero = self.ds_config.get("zero_optimization", {})
        optimizer = None
        if zero.get("offload_optimizer"):
            optimizer = self._cpu_adam(groups)
        if optimizer is None:
            optimizer = factory(groups)
        engine, _, _, _ = self.deepspeed.initialize(model=self._model, optimizer=optimizer, config=self.ds_config)
        self.engine = engine
        if self.stage == 3:
            # Makes transformers' generate() keep all ranks stepping together (synced_gpus) under
            # ZeRO-3; created after loading, so from_pretrained did not load through zero.Init.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        self.log(f"deepspeed: ZeRO stage {self.stage}, offload "
                 f"{'optimizer' if zero.get('offload_optimizer') else 'none'}"
                 f"{' + parameters' if zero.get('offload_param') else ''}")
        # The loop's schedule sets lr on these param groups, which DeepSpeed's optimizer steps with.
        return optimizer

    def _cpu_adam(self, groups):
        cfg = self.cfg
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), adamw_mode=True)
        except Exception as e:  # the op could not be built here: torch's AdamW steps on CPU instead
            self.log(f"deepspeed: DeepSpeedCPUAdam unavailable ({type(e).__name__}); using torch AdamW on CPU")
            return None

    def no_sync(self, model, last: bool):
        # DeepSpeed reduces gradients at the accumulation boundary: the last micro-batch of a step.
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss, model) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already scaled the loss

    def clip_and_step(self, model, optimizer, max_norm: float) -> None:
        self.engine.step()  # clipping: gradient_clipping in the DeepSpeed config (= max_norm)


class DeepSpeedState(ShardedState):
    def _gathered(self, params):
        if self.strategy.stage == 3:
            return self.strategy.deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def trainable_state_dict(self, model) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                with self._gathered([p]):  # one parameter at a time
                    out[n] = p.detach().float().cpu().clone()
        return out

    def load_trainable_state_dict(self, model, weights) -> None:
        params = dict(model.named_parameters())
        for n, value in weights.items():
            p = params[n]
            gather = self.strategy.deepspeed.zero.GatheredParameters([p], modifier_rank=0) \
                if self.strategy.stage == 3 else contextlib.nullcontext()
            with gather:
                with torch.no_grad():
                    p.copy_(value.to(p.device, p.dtype))

    def full_state_dict_for_export(self, model):
        if self.strategy.cfg.method == "lora":
            sd = self.trainable_state_dict(model)
            return sd if self.strategy.is_main else None
        if self.strategy.stage != 3:
            return None  # every rank holds the whole model already
        out = {}
        for n, p in model.named_parameters():
            with self._gathered([p]):  # gather per parameter; rank 0 keeps a CPU copy
                if self.strategy.is_main:
                    out[n] = p.detach().cpu().clone()
        persistent = set(model.state_dict().keys())
        for n, b in model.named_buffers():
            if self.strategy.is_main and n in persistent:
                out[n] = b.detach().cpu().clone()
        return out if self.strategy.is_main else None

    def save_shards(self, model, optimizer, folder: Path) -> None:
        # tag="": DeepSpeed writes straight into `folder` (rank 0 the module file, every rank its
        # zero_pp_rank_* optimizer partition); frozen base weights are not written.
        self.strategy.engine.save_checkpoint(str(folder), tag="", save_latest=False,
                                             exclude_frozen_parameters=self.strategy.cfg.method == "lora")
        self.save_rank_rng(folder)
        self.write_shards_info(folder, format="deepspeed", stage=self.strategy.stage)

    def load_shards(self, model, optimizer, folder: Path) -> None:
        path, _ = self.strategy.engine.load_checkpoint(
            str(folder), tag="", load_module_strict=self.strategy.cfg.method != "lora", load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"DeepSpeed could not read the checkpoint {folder}",
                            hint="resume with the same --deepspeed setting and process count it was saved with")
        self.restore_rank_rng(folder)
