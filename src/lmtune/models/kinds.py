"""Model kinds: how a kind of model is loaded, where LoRA goes and how a flat batch is fed to it.

    causal_lm   a decoder-only language model (AutoModelForCausalLM, InternLM2 via our mapping)
    reward      the same backbone with a scalar head (AutoModelForSequenceClassification, one label):
                objective "reward"; exported as a sequence-classification folder

A new kind (e.g. a vision-language model) is a new class with the same four methods, returned by
`model_kind(cfg)`; the loop, the objectives and the strategies stay as they are.
"""

from __future__ import annotations

import torch


class CausalLM:
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    head = "lm"  # what load_model puts on the backbone

    def load_tokenizer(self, cfg):
        from lmtune.models.loader import load_tokenizer

        return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)

    def load(self, cfg, device: torch.device):
        """The base model, before adapters: fp32 master weights on CPU (autocast handles bf16
        compute) and for full fine-tuning; the checkpoint's own dtype for frozen GPU weights."""
        from lmtune.models.loader import load_model

        dtype = cfg.torch_dtype
        if dtype == "auto":
            dtype = "float32" if device.type == "cpu" or cfg.method == "full" else "auto"
        return load_model(
            cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle,
            quantization=cfg.quantization, device=str(device) if cfg.quantization != "none" else None,
            attn_implementation=None if cfg.attn_implementation == "auto" else cfg.attn_implementation,
            head=self.head,
        )

    def lora_targets(self, cfg, model):
        return cfg.lora_target_modules

    def add_lora(self, model, cfg, custom_modules: dict | None = None):
        """The model wrapped by peft with the config's LoRA (on `lora_targets`); `custom_modules`
        maps base layer types to LoRA layer classes (the fused layers of lmtune.models.lora_fused)."""
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=self.lora_targets(cfg, model), task_type=self.peft_task_type, bias="none")
        if custom_modules:
            lora._register_custom_module(custom_modules)  # peft's dispatch hook for custom LoRA layers
        return get_peft_model(model, lora)

    def inputs(self, batch: dict) -> dict:
        """forward() keyword arguments of a flat batch (one row, restarting position ids)."""
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}


class RewardModel(CausalLM):
    name = "reward"
    peft_task_type = "SEQ_CLS"  # peft then also trains and saves the new `score` head
    head = "score"

    def load(self, cfg, device: torch.device):
        model = super().load(cfg, device)
        if cfg.quantization != "none":
            model.score.float()  # the new head trains in full precision next to the 4/8-bit body
        return model


def model_kind(cfg) -> CausalLM:
    return RewardModel() if cfg.objective == "reward" else CausalLM()


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list:
    """The transformer blocks (what gets sharded, checkpointed or compiled one by one):
    transformers names their classes in `_no_split_modules`."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return layers
