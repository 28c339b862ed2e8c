"""In-training chat probes: greedy answers to `evaluation_inputs`, printed and logged."""

from __future__ import annotations

import torch


def probe_answers(model, tokenizer, template, cfg, device: torch.device, amp_dtype) -> list[dict]:
    from lmtune.models.generation import greedy_reply
    from lmtune.models.quant import trainable_layout

    was_training = model.training
    model.eval()
    model.config.use_cache = True
    answers = []
    # Every process generates (sharded strategies gather weights collectively); only the main one
    # prints. trainable_layout: generating must not leave 4-bit layers in bitsandbytes' CPU
    # inference layout, in which LoRA gradients are silently wrong (see models/quant.py).
    try:
        with trainable_layout(model):
            for q in cfg.evaluation_inputs:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    text, stopped = greedy_reply(model, tokenizer, template, q, cfg.system, cfg.eval_max_new_tokens)
                answers.append({"question": q, "answer": text, "stopped": stopped})
    finally:
        model.config.use_cache = False
        if was_training:
            model.train()
    return answers
