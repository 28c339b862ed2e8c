"""Model kinds: how a kind of model is loaded, where LoRA goes and how a flat batch is fed to it.

    causal_lm         a decoder-only language model (AutoModelForCausalLM, InternLM2 via our mapping)
    reward            the same backbone with a scalar head (AutoModelForSequenceClassification, one
                      label): objective "reward"; exported as a sequence-classification folder
    vision_language   a LLaVA composed from a causal LM + a vision tower, or an existing
                      vision-language model (models/vision.py)

A new kind is a new class with the same methods, returned by `model_kind(cfg)`; the loop, the
objectives and the strategies stay as they are. Kinds that see images also say how an image
becomes tokens (`image_tokens`) and tensors (`vision_inputs`); a causal LM sees none.
"""

from __future__ import annotations

import re

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
        """`lora_target_modules`, or with `lora_layers` set, the full names of those modules in the
        picked decoder layers (peft takes no layer choice with a target given as one string)."""
        if cfg.lora_layers is None:
            return cfg.lora_target_modules
        from lmtune.config import lora_layer_indices
        from lmtune.errors import UserError

        wanted = cfg.lora_target_modules
        if isinstance(wanted, str) and wanted != "all-linear":
            raise UserError("with lora_layers, give lora_target_modules as a list of module names or 'all-linear'",
                            where=cfg._source, hint=f"e.g. lora_target_modules = [{wanted!r}]")
        short = None if wanted == "all-linear" else set(wanted)
        layer_of = {}
        for name, module in model.named_modules():
            found = re.search(r"\.layers\.(\d+)\.", name)
            if found and isinstance(module, torch.nn.Linear) and (short is None or name.rsplit(".", 1)[-1] in short):
                layer_of[name] = int(found.group(1))
        n = getattr(model.config, "num_hidden_layers", None)
        if not layer_of or not isinstance(n, int):
            raise UserError(f"lora_layers is set, but {cfg.model} has no numbered decoder layers ('.layers.N.') "
                            "with those modules", where=cfg._source, hint="remove lora_layers (LoRA on every layer)")
        try:
            picked = set(lora_layer_indices(cfg.lora_layers, n))
        except ValueError as e:
            raise UserError(f"config key 'lora_layers': {e}", where=cfg._source) from None
        return sorted(name for name, layer in layer_of.items() if layer in picked)

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

    def image_tokens(self, cfg, tokenizer):
        return None  # sees no images

    def vision_inputs(self, rows: list[dict], batch: dict) -> dict:
        return {}


class RewardModel(CausalLM):
    name = "reward"
    peft_task_type = "SEQ_CLS"  # peft then also trains and saves the new `score` head
    head = "score"

    def load(self, cfg, device: torch.device):
        model = super().load(cfg, device)
        if cfg.quantization != "none":
            model.score.float()  # the new head trains in full precision next to the 4/8-bit body
        return model


def model_kind(cfg):
    """The kind of `cfg.model`: a reward model for objective "reward"; vision-language when a vision
    tower is composed with it or its config is an image-text-to-text model; else a causal LM."""
    from lmtune.models import vision

    if cfg.objective == "reward":
        return RewardModel()
    if cfg.vision_tower or vision.is_vision_language(vision.read_model_config(cfg.model)):
        return vision.VisionLanguage(cfg)
    return CausalLM()


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model(model):
    """A vision-language model's language model (its decoder stack), else the model itself."""
    base = base_model(model)
    inner = getattr(base, "model", None)
    if getattr(base.config, "text_config", None) is not None:
        for name in ("language_model", "text_model"):
            if hasattr(inner, name):
                return getattr(inner, name)
    return model


def decoder_layers(model) -> list:
    """The transformer blocks of the language model (what gets sharded, checkpointed or compiled one
    by one): transformers names their classes in `_no_split_modules`."""
    root = language_model(model)
    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    layers = [m for m in root.modules() if type(m).__name__ in names]
    if not layers:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in root.modules() if isinstance(m, GradientCheckpointingLayer)]
    return layers
