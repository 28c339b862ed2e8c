"""Multi-process engines: DDP, FSDP2 (`torch.distributed.fsdp.fully_shard`) and DeepSpeed ZeRO.

Each engine implements the interface of `SingleProcess` (train/distributed.py), so the loop reads
the same for all of them. The process group comes from the environment torchrun (or srun, see
distributed_launch.py) sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Started
without a launcher, an engine runs as a group of one, which is handy for trying ZeRO-3 or CPU
offload on a single GPU.

Gradients: the loop scales each micro-batch loss by world_size / (loss tokens of the whole
global step); every engine averages gradients over processes; so the update is that of the
token mean over the global step, whatever the process count (checked in tests/test_distributed.py).

Checkpoints: DDP saves like one process (rank 0 writes the whole trainable state). FSDP2 and
DeepSpeed are `sharded`: every rank writes its own part (torch.distributed.checkpoint files for
FSDP2, DeepSpeed's own files for ZeRO) into a staging folder, and the main process moves them
into the checkpoint folder, writes the manifest and renames it into place once all ranks wrote.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lmtune.errors import UserError
from lmtune.train.distributed import SingleProcess

SHARDS_FILE = "shards.json"  # in a sharded checkpoint: which engine wrote it, how, by how many ranks


def make_engine(cfg):
    """The engine for `cfg.strategy` (auto/single under torchrun: DDP; with `deepspeed` set: DeepSpeed)."""
    strategy = cfg.strategy
    if strategy in ("auto", "single"):
        strategy = "deepspeed" if cfg.deepspeed else "ddp"
    if strategy == "deepspeed":
        return DeepSpeedEngine(cfg)
    if cfg.deepspeed:
        raise UserError(f"deepspeed = {cfg.deepspeed!r} is set but strategy = {cfg.strategy!r}",
                        where=cfg._source, hint="set strategy = 'deepspeed' (or drop the deepspeed key)")
    if strategy == "fsdp2":
        return FSDP2Engine(cfg)
    return DDPEngine(cfg)


# --------------------------------------------------------------------------- process group


def init_process_group() -> tuple[int, int, int]:
    """Join (or create) the default process group; returns (rank, world_size, local_rank)."""
    from lmtune.train.distributed_launch import env_from_slurm

    env_from_slurm()
    if "RANK" not in os.environ:  # not started by a launcher: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        # NCCL on GPU; gloo on CPU. timeout: a checkpoint save or a probe on a large model is slow.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30),
                                device_id=torch.device("cuda", local_rank) if cuda else None)
        atexit.register(_destroy)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _destroy() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ProcessGroupEngine(SingleProcess):
    name = "ddp"
    sharded = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = init_process_group()
        self.is_main = self.rank == 0

    def device(self, preferred: torch.device) -> torch.device:
        if preferred.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return preferred

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[lmtune] {msg}", file=sys.stderr, flush=True)

    def sum_scalar(self, value: torch.Tensor) -> float:
        t = value.detach().clone().float()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def barrier(self) -> None:
        dist.barrier()

    def _amp_dtype(self):
        from lmtune.train.loop import pick_device, pick_precision

        return pick_precision(self.cfg, self.device(pick_device(self.cfg.device)))

    def _write_shards_info(self, folder: Path, **info) -> None:
        if self.is_main:
            data = {"engine": self.name, "world_size": self.world_size, "method": self.cfg.method, **info}
            (folder / SHARDS_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------- DDP


class DDPEngine(_ProcessGroupEngine):
    """Every process holds the whole model; gradients are all-reduced (averaged) after backward."""

    name = "ddp"

    def wrap(self, model, cfg):
        from torch.nn.parallel import DistributedDataParallel

        device = next(p.device for p in model.parameters())
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, model, last: bool):
        # Skip the all-reduce for all but the last micro-batch of a step (gradients accumulate locally).
        return contextlib.nullcontext() if last else model.no_sync()


# --------------------------------------------------------------------------- FSDP2


def _causal_lm(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_layers(model) -> list:
    """Transformer blocks to shard one by one: transformers names them in `_no_split_modules`."""
    names = set(getattr(_causal_lm(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # fall back to the layers list of the common decoder layout
        inner = getattr(_causal_lm(model), "model", None)
        layers = list(getattr(inner, "layers", []))
    return layers


class FSDP2Engine(_ProcessGroupEngine):
    """Fully sharded data parallel (FSDP2): parameters, gradients and optimizer state are split over
    processes; each transformer block gathers its weights just for its own forward/backward."""

    name = "fsdp2"
    sharded = True

    def wrap(self, model, cfg):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from lmtune.models.quant import is_quantized_param

        device = next((p.device for p in model.parameters() if not is_quantized_param(p)), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (self.world_size,))
        amp = self._amp_dtype()
        mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32 if amp else None)
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
        # QLoRA: 4/8-bit base weights are frozen and packed by bitsandbytes; they stay whole on every
        # process (ignored by FSDP) while the LoRA weights, norms and embeddings are sharded.
        ignored = {p for p in model.parameters() if is_quantized_param(p)} or None
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
        for layer in _decoder_layers(model):
            fully_shard(layer, **kwargs)
        # The root group is the transformers model (not the peft wrapper), so that generate(),
        # which calls the transformers model directly, gathers the root's weights too.
        root = _causal_lm(model)
        fully_shard(root, **kwargs)
        self._root = root
        # transformers' generate() reads this mark to keep all ranks stepping together (synced_gpus).
        for m in model.modules():
            m._is_fsdp_managed_module = True
        return model

    def _fsdp_modules(self, model):
        from torch.distributed.fsdp import FSDPModule

        return [m for m in model.modules() if isinstance(m, FSDPModule)]

    def no_sync(self, model, last: bool):
        # Accumulate unsharded gradients locally; reduce-scatter only after the last micro-batch.
        for m in self._fsdp_modules(model):
            m.set_requires_gradient_sync(last, recurse=False)
        return contextlib.nullcontext()

    def clip_and_step(self, model, optimizer, max_norm: float) -> None:
        if max_norm and max_norm > 0:
            params = [p for p in model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)  # DTensor-aware: the global norm
        optimizer.step()

    # -- whole (unsharded) trainable weights: for the export and for non-sharded readers
    def trainable_state_dict(self, model) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if isinstance(p, DTensor) else p  # collective: every rank calls
                out[n] = full.detach().cpu().clone()
        return out

    def load_trainable_state_dict(self, model, weights) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))

    def full_state_dict_for_export(self, model):
        if self.cfg.method == "lora":
            sd = self.trainable_state_dict(model)
            return sd if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Gathered one tensor at a time; with cpu_offload only rank 0 keeps the (CPU) copies.
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # Tied weights (lm_head = embed_tokens) once, under the name transformers saves them by.
        keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return {k: v for k, v in sd.items() if k in keep}

    # -- sharded checkpoints: torch.distributed.checkpoint (DCP), one file per rank + .metadata
    def _dcp_state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": msd, "optim": osd}

    def save_shards(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(model, optimizer), checkpoint_id=str(folder))
        torch.save({"torch": torch.get_rng_state()}, folder / f"rng-rank{self.rank}.pt")
        self._write_shards_info(folder, format="dcp")

    def load_shards(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._dcp_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        _restore_rank_rng(folder, self.rank)


def _restore_rank_rng(folder: Path, rank: int) -> None:
    p = folder / f"rng-rank{rank}.pt"
    if p.is_file():  # the same world size: each rank continues its own random stream (dropout)
        torch.set_rng_state(torch.load(p, weights_only=True)["torch"])


# --------------------------------------------------------------------------- DeepSpeed

DEEPSPEED_NAMES = {
    "zero1": "zero1", "zero2": "zero2", "zero2_offload": "zero2_offload", "zero3": "zero3",
    "zero3_offload": "zero3_offload",
}
TEMPLATE_DIR = Path(__file__).parent / "deepspeed_configs"


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
    ds.setdefault("wall_clock_breakdown", False)
    if zero.get("offload_optimizer"):
        # lmtune builds the optimizer (DeepSpeedCPUAdam when it can be built, else torch AdamW).
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds, notes


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise UserError(
            "strategy 'deepspeed' needs the deepspeed package",
            hint="pip install 'lmtune[deepspeed]'  (on a machine without CUDA: DS_BUILD_OPS=0 pip install deepspeed)",
        ) from None
    return deepspeed


class _ThroughEngine(torch.nn.Module):
    """The model as the loop sees it under DeepSpeed: parameters of the model, forward of the engine."""

    def __init__(self, model, owner):
        super().__init__()
        self.module = model
        object.__setattr__(self, "_owner", owner)  # not a submodule

    def forward(self, *args, **kwargs):
        return self._owner.engine(*args, **kwargs)


class DeepSpeedEngine(_ProcessGroupEngine):
    """DeepSpeed ZeRO stage 1/2/3 (optionally offloading to CPU), driven by the lmtune loop:
    lmtune builds the optimizer and schedule; DeepSpeed partitions, reduces and steps."""

    name = "deepspeed"
    sharded = True

    def __init__(self, cfg):
        self.deepspeed = _import_deepspeed()
        super().__init__(cfg)
        self.ds_config, notes = deepspeed_config(cfg, self.world_size, self._amp_dtype())
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        for n in notes:
            self.log(f"deepspeed: {n}")
        self.engine = None
        self._model = None

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

    def _gathered(self, params):
        if self.stage == 3:
            return self.deepspeed.zero.GatheredParameters(params, modifier_rank=None)
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
            with self.deepspeed.zero.GatheredParameters([p], modifier_rank=0) if self.stage == 3 \
                    else contextlib.nullcontext():
                with torch.no_grad():
                    p.copy_(value.to(p.device, p.dtype))

    def full_state_dict_for_export(self, model):
        if self.cfg.method == "lora":
            sd = self.trainable_state_dict(model)
            return sd if self.is_main else None
        if self.stage != 3:
            return None  # every rank holds the whole model already
        out = {}
        for n, p in model.named_parameters():
            with self._gathered([p]):  # gather per parameter; rank 0 keeps a CPU copy
                if self.is_main:
                    out[n] = p.detach().cpu().clone()
        persistent = set(model.state_dict().keys())
        for n, b in model.named_buffers():
            if self.is_main and n in persistent:
                out[n] = b.detach().cpu().clone()
        return out if self.is_main else None

    def save_shards(self, model, optimizer, folder: Path) -> None:
        # tag="": DeepSpeed writes straight into `folder` (rank 0 the module file, every rank its
        # zero_pp_rank_* optimizer partition); frozen base weights are not written.
        self.engine.save_checkpoint(str(folder), tag="", save_latest=False,
                                    exclude_frozen_parameters=self.cfg.method == "lora")
        torch.save({"torch": torch.get_rng_state()}, folder / f"rng-rank{self.rank}.pt")
        self._write_shards_info(folder, format="deepspeed", stage=self.stage)

    def load_shards(self, model, optimizer, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="", load_module_strict=self.cfg.method != "lora",
                                              load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"DeepSpeed could not read the checkpoint {folder}",
                            hint="resume with the same --deepspeed setting and process count it was saved with")
        _restore_rank_rng(folder, self.rank)


# --------------------------------------------------------------------------- reading sharded checkpoints


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SHARDS_FILE).is_file()


def load_sharded_weights(folder: Path, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainable weights of a sharded checkpoint, whole, in one process (no process group):
    for `lmtune convert pth_to_hf`. `params` are the model's parameters by name; for DCP files the
    values are read straight into them (no second copy of the model in memory)."""
    folder = Path(folder)
    info = json.loads((folder / SHARDS_FILE).read_text(encoding="utf-8"))
    if info.get("format") == "dcp":
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(str(folder)).read_metadata()
        saved = {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}
        wanted = {n: p for n, p in params.items() if n in saved}
        if not wanted:
            raise UserError(f"checkpoint {folder} holds no weights of this model",
                            hint="pass the config the checkpoint was trained with, or omit CONFIG")
        target = {n: p.detach() for n, p in wanted.items()}
        dcp.load({"model": target}, checkpoint_id=str(folder), no_dist=True)
        return target
    if info.get("format") == "deepspeed":
        _import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The fp32 master weights, put together from every rank's partition file.
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=""))
    raise UserError(f"checkpoint {folder}: unknown shard format {info.get('format')!r}")
