"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state are
split over processes; each transformer block gathers its weights just for its own forward/backward.
Checkpoints: torch.distributed.checkpoint (DCP) files, one per rank, plus .metadata."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lmtune.errors import UserError
from lmtune.models.kinds import base_model, decoder_layers
from lmtune.train.strategies.process_group import ProcessGroupStrategy, ShardedState


class FSDP2Strategy(ProcessGroupStrategy):
    name = "fsdp2"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.state = FSDP2State(self)

    def setup_precision(self, amp_dtype, device: torch.device) -> None:
        if amp_dtype == torch.float16:
            raise UserError("fp16 with strategy 'fsdp2' is not supported: its gradients need loss scaling",
                            where=self.cfg._source,
                            hint="use mixed_precision = 'bf16' (GPUs since Ampere), or strategy = 'ddp' / "
                            "'deepspeed', which scale fp16 losses")

    def wrap(self, model, cfg):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from lmtune.models.quant import is_quantized_param

        device = next((p.device for p in model.parameters() if not is_quantized_param(p)), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (self.world_size,))
        amp = self.amp_dtype()
        mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32 if amp else None)
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload is True else OffloadPolicy()
        # QLoRA: 4/8-bit base weights are frozen and packed by bitsandbytes; they stay whole on every
        # process (ignored by FSDP) while the LoRA weights, norms and embeddings are sharded.
        ignored = {p for p in model.parameters() if is_quantized_param(p)} or None
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        # The root group is the transformers model (not the peft wrapper), so that generate(),
        # which calls the transformers model directly, gathers the root's weights too.
        root = base_model(model)
        fully_shard(root, **kwargs)
        # transformers' generate() reads this mark to keep all ranks stepping together (synced_gpus).
        for m in model.modules():
            m._is_fsdp_managed_module = True
        return model

    def no_sync(self, model, last: bool):
        from torch.distributed.fsdp import FSDPModule

        # Accumulate unsharded gradients locally; reduce-scatter only after the last micro-batch.
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_requires_gradient_sync(last, recurse=False)
        return contextlib.nullcontext()


class FSDP2State(ShardedState):
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
        is_main = self.strategy.is_main
        if self.strategy.cfg.method == "lora":
            sd = self.trainable_state_dict(model)
            return sd if is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Gathered one tensor at a time; with cpu_offload only rank 0 keeps the (CPU) copies.
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main:
            return None
        # Tied weights (lm_head = embed_tokens) once, under the name transformers saves them by.
        keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return {k: v for k, v in sd.items() if k in keep}

    # -- sharded checkpoints
    def _dcp_state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": msd, "optim": osd}

    def save_shards(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(model, optimizer), checkpoint_id=str(folder))
        self.save_rank_rng(folder)
        self.write_shards_info(folder, format="dcp")

    def load_shards(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._dcp_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        self.restore_rank_rng(folder)
