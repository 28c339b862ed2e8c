"""GPU checks of the speed paths of issue 16, run on the device machine (skipped without CUDA):

    python -m pytest tests/gpu/test_gpu_speed.py -q

- the fused LoRA layer against peft's own LoRA layer through the whole fast path (varlen
  attention, fused loss, liger), bf16 base and NF4 base: same loss and LoRA gradients;
- the automatic plan (checkpointing + micro-batch from the memory estimate) on a real Trainer:
  the measured peak stays within the estimate, and the plan gives the same loss as checkpointing
  every layer.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from lmtune.models import attention as attn  # noqa: E402
from lmtune.models.lora_fused import fused_modules  # noqa: E402
from lmtune.train.losses import LossHead  # noqa: E402
from lmtune.train.objectives import flat_batch, loss_sum  # noqa: E402

DEV = "cuda"


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _llama(hidden=512, layers=2, vocab=2000):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8,
                      max_position_embeddings=8192)
    m = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16)
    m.config.use_cache = False
    return m


def _nf4(model):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if type(mod) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16,
                                  device="meta")
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, quant_storage=torch.bfloat16).to(DEV)
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.rsplit(".", 1)[-1], q)
    model.is_loaded_in_4bit = True
    return model


def _rows(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(8, 600, (1,), generator=g))
        ids = torch.randint(0, vocab, (L,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (L // 4) + ids[L // 4:]})
    return rows


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fused_lora_equals_peft_lora_through_the_fast_path(quant):
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from peft import LoraConfig, get_peft_model

    from lmtune.train.fast_path import FastPath

    attn.register()
    base = _llama()
    MODEL_TYPE_TO_APPLY_LIGER_FN["llama"](rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                         fused_linear_cross_entropy=False, model=base)
    base.set_attn_implementation(attn.VARLEN)
    results = []
    state = None
    for fused in (False, True):
        m = copy.deepcopy(base)
        if quant == "nf4":
            _nf4(m)
            for p in m.parameters():
                p.requires_grad_(False)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        if fused:
            lora._register_custom_module(fused_modules(quant))
        m = get_peft_model(m, lora)
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if state is None:
            state = {k: v for k, v in m.state_dict().items() if "lora" in k}
        m.load_state_dict(state, strict=False)
        kinds = {type(mod).__name__ for mod in m.modules() if hasattr(mod, "lora_A")}
        assert any(k.startswith("Fused") for k in kinds) == fused, kinds
        fp = FastPath(attention=attn.VARLEN, loss="chunked", loss_head=LossHead(m.get_output_embeddings()))
        batch = {k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in flat_batch(_rows(5, 2000, 3)).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s, n = loss_sum(m, batch, fast=fp)
        s.backward()
        results.append((float(s), {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}))
        assert all(g.dtype == torch.float32 for g in results[-1][1].values())
    (s0, g0), (s1, g1) = results
    assert s1 == pytest.approx(s0, rel=5e-3)
    errs = {k: rel(g1[k], g0[k]) for k in g0}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 3e-2, (worst, errs[worst])


def test_auto_plan_fits_its_estimate_and_trains_like_full_checkpointing(tmp_path):
    """A 0.7B Llama, LoRA: the automatic checkpointing plan for micro-batches of up to 1024 tokens
    (several per step, their count varying) stays under its estimate and gives the loss of
    checkpointing every layer with micro-batches of batch_size rows."""
    from lmtune.config import validate
    from lmtune.train.loop import Trainer

    rows = _rows(24, 32000, 7)
    out = {}
    for name, extra in (("auto", {"batch_tokens": 1024}), ("all", {"gradient_checkpointing": True})):
        model = _llama(hidden=2048, layers=12, vocab=32000)
        raw = dict(model="random", method="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, lr=1e-4,
                   batch_size=4, accumulative_counts=2, max_length=600, warmup_ratio=0.0, lr_scheduler="constant",
                   mixed_precision="bf16", seed=0, max_steps=10, device="cuda", gradient_checkpointing="auto")
        raw.update(extra)
        t = Trainer(validate(raw), tmp_path / name, model=model, rows=rows)
        base = torch.cuda.memory_allocated()
        t.setup()
        torch.cuda.reset_peak_memory_stats()
        losses = [t.step()[0] for _ in range(3)]
        peak = torch.cuda.max_memory_allocated() - base
        out[name] = (losses, t.fast, peak)
        del t, model
        torch.cuda.empty_cache()
    losses, fast, peak = out["auto"]
    assert fast.checkpointing == "off" and fast.batch_tokens == 1024 and fast.plan is not None
    assert peak <= fast.plan.need_gib * 2**30, (peak / 2**30, fast.plan.need_gib)
    assert losses == pytest.approx(out["all"][0], rel=2e-3)
