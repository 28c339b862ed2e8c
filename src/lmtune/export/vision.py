"""Vision-language models -> Hugging Face folders, with their processor.

    composed LLaVA   always a full `LlavaForConditionalGeneration` folder (LoRA merged in), loadable
                     with plain transformers (`AutoModelForImageTextToText` + `AutoProcessor`). After
                     QLoRA the merge goes onto the full-precision base: the LLM and tower are loaded
                     again unquantized on the CPU and the trained weights copied in first.
    existing VLM     as for text: the PEFT adapter (base = the model folder) or the full model; the
                     processor's files ride along so the folder is complete either way.

The processor of a composed LLaVA carries the chat template lmtune trained with, wrapped so that it
also renders image content parts (see models/vision.parts_template).
"""

from __future__ import annotations

import dataclasses
import sys

import torch


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


def full_precision_merge(model, cfg):
    """The merged full model. A quantized base is composed again unquantized (CPU, the checkpoint's
    dtype) and the trained weights (adapters, projector, tower) are copied in before merging."""
    from lmtune.models.kinds import model_kind

    if not hasattr(model, "peft_config"):
        return model
    if cfg.quantization == "none":
        return model.merge_and_unload()
    _log("merging onto the full-precision base (loading the LLM and the vision tower unquantized on the CPU)…")
    trained = {n: p.detach().to("cpu") for n, p in model.named_parameters() if p.requires_grad}
    fp_cfg = dataclasses.replace(cfg, quantization="none")
    fp_cfg._source = cfg._source
    kind = model_kind(fp_cfg)
    fresh = kind.add_lora(kind.load(fp_cfg, torch.device("cpu"), dtype="auto"), fp_cfg)  # its own dtype
    params = dict(fresh.named_parameters())
    missing = [n for n in trained if n not in params]
    if missing:
        raise RuntimeError(f"the unquantized model has no parameter {missing[0]}")
    with torch.no_grad():
        for n, v in trained.items():
            params[n].copy_(v.to(params[n].dtype))
    return fresh.merge_and_unload()


def processor_for(cfg, tokenizer, template):
    """The processor to save: the model's, with the tokenizer trained with and its chat template."""
    from lmtune.data.images import PARTS_MARK
    from lmtune.models.kinds import model_kind
    from lmtune.models.vision import parts_template

    kind = model_kind(cfg)
    proc = kind.processor(cfg, tokenizer)
    proc.tokenizer = tokenizer
    text = template.jinja() if hasattr(template, "jinja") else getattr(tokenizer, "chat_template", None)
    if kind.composed and text:
        text = text if PARTS_MARK in text else parts_template(text)
    if text:
        tokenizer.chat_template = text
        proc.chat_template = text
    return proc
