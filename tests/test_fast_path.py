"""The fast path on CPU: the fused loss and the packed attention against the plain PyTorch path,
forward and backward, on random inputs; the Trainer with them switched on; the printed choices.

The GPU kernels themselves (torch varlen, FlexAttention compiled, liger) are checked by
tests/gpu/test_gpu_fast_path.py through the device tool.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from lmtune.config import load_config
from lmtune.errors import UserError
from lmtune.models import attention as attn
from lmtune.train.losses import LossHead, linear_cross_entropy, plain_cross_entropy
from lmtune.train.objectives import flat_batch, loss_sum


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, None])
def test_linear_cross_entropy_matches_plain_fwd_bwd(bias, chunk):
    g = torch.Generator().manual_seed(int(chunk or 0) + bias)
    n, h, v = 53, 24, 301
    x = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100  # ignored rows contribute nothing
    out = linear_cross_entropy(x, w, t, bias=b, chunk=chunk)
    gx, gw, *gb = torch.autograd.grad(out * 0.7, [x, w] + ([b] if bias else []))
    ref = plain_cross_entropy(x, w, t, bias=b)
    rx, rw, *rb = torch.autograd.grad(ref * 0.7, [x, w] + ([b] if bias else []))
    assert float(out) == pytest.approx(float(ref), rel=1e-10)
    assert _rel(gx, rx) < 1e-10 and _rel(gw, rw) < 1e-10
    if bias:
        assert _rel(gb[0], rb[0]) < 1e-10


def test_linear_cross_entropy_bf16_autocast_and_frozen_weight():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(500, 32, generator=g)  # frozen (LoRA): no weight gradient is formed
    t = torch.randint(0, 500, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(x, w, t, chunk=16)
    (gx,) = torch.autograd.grad(out, [x])
    ref = plain_cross_entropy(x.double(), w.double(), t)
    (rx,) = torch.autograd.grad(ref, [x])
    assert out.dtype == torch.float32 and gx.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=1e-2)
    assert _rel(gx.double(), rx) < 2e-2


def test_reference_varlen_equals_per_sample_attention():
    g = torch.Generator().manual_seed(2)
    lens = [5, 1, 17, 9]
    T, hq, hkv, d = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(T, hh, d, generator=g, dtype=torch.float64) for hh in (hq, hkv, hkv))
    cu = torch.tensor([0, 5, 6, 23, 32], dtype=torch.int32)
    out = attn.reference_varlen(q, k, v, cu, d ** -0.5)
    a = 0
    for n in lens:  # each sample alone, plain math
        qs, ks, vs = q[a:a + n], k[a:a + n].repeat_interleave(2, 1), v[a:a + n].repeat_interleave(2, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * d ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), vs)
        assert _rel(out[a:a + n], ref) < 1e-12
        a += n


def _torch_flex_cpu_backward() -> bool:
    """Whether this torch build's own FlexAttention runs backward on the CPU (torch's feature, probed
    on torch alone: lmtune's code is not involved, so a failure here says nothing about ours)."""
    if not attn.flex_available():
        return False
    from torch.nn.attention.flex_attention import flex_attention

    x = torch.randn(1, 1, 16, 8, requires_grad=True)
    try:
        flex_attention(x, x, x).sum().backward()
    except RuntimeError as e:
        if "does not support backward on CPU" in str(e):
            return False
        raise
    return True


NO_FLEX = pytest.mark.skipif(not attn.flex_available(), reason="this torch has no FlexAttention")


@NO_FLEX
def test_flex_document_mask_equals_reference():
    g = torch.Generator().manual_seed(3)
    T, d = 200, 16
    q, k, v = (torch.randn(T, 2, d, generator=g) for _ in range(3))
    cu = torch.tensor([0, 70, 71, 150, 200], dtype=torch.int32)
    out = attn._flex(q, k, v, cu, d ** -0.5)
    ref = attn.reference_varlen(q, k, v, cu, d ** -0.5)
    assert _rel(out, ref) < 1e-4


@NO_FLEX
def test_flex_block_mask_follows_new_boundaries_at_a_reused_address():
    """Two micro-batches with the same sample count and length but other boundaries, the second's
    boundaries at the address the first's had (what the caching allocator does once the first is
    freed; a shared storage makes it certain here): the second must get its own block mask."""
    g = torch.Generator().manual_seed(5)
    T, d = 256, 16
    q, k, v = (torch.randn(T, 2, d, generator=g) for _ in range(3))
    storage = torch.empty(5, dtype=torch.int32)
    first = storage[:]
    first.copy_(torch.tensor([0, 70, 71, 150, T], dtype=torch.int32))
    assert _rel(attn._flex(q, k, v, first, d ** -0.5), attn.reference_varlen(q, k, v, first, d ** -0.5)) < 1e-4
    second = storage[:]  # a new tensor at the same address
    second.copy_(torch.tensor([0, 10, 140, 200, T], dtype=torch.int32))
    assert second.data_ptr() == first.data_ptr() and second.shape == first.shape
    out = attn._flex(q, k, v, second, d ** -0.5)
    assert _rel(out, attn.reference_varlen(q, k, v, second, d ** -0.5)) < 1e-4
    # Within one micro-batch (every layer gets the same tensor) the mask is built once.
    mask = attn._FLEX_CACHE["mask"]
    attn._flex(q, k, v, second, d ** -0.5)
    assert attn._FLEX_CACHE["mask"] is mask


def _rows(tokenizer, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(4, 40, (1,), generator=g))
        ids = torch.randint(10, len(tokenizer) - 1, (L,), generator=g).tolist()
        labels = [-100] * (L // 3) + ids[L // 3:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _packed_loss_and_grad(model_dir, batch, name, backward=True):
    from transformers import AutoModelForCausalLM

    from lmtune.train.fast_path import FastPath

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False  # as in training (with a cache, transformers skips packing detection)
    model.set_attn_implementation(name)
    if not backward:
        with torch.no_grad():
            s, n = loss_sum(model, batch, fast=FastPath(attention=name))
        return float(s), n, None
    s, n = loss_sum(model, batch, fast=FastPath(attention=name))
    s.backward()
    return float(s.detach()), n, model.model.layers[0].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("impl", [attn.VARLEN, pytest.param(attn.FLEX, marks=NO_FLEX)])
def test_registered_attention_gives_the_sdpa_loss_and_grads(tiny_model_dir, impl):
    """A packed forward(+backward) through the registered function equals transformers' SDPA path.
    FlexAttention's backward runs only where torch supports it on the CPU; its forward always."""
    from transformers import AutoTokenizer

    attn.register()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = flat_batch(_rows(tok))
    backward = impl != attn.FLEX or _torch_flex_cpu_backward()
    s0, n0, g0 = _packed_loss_and_grad(tiny_model_dir, batch, "sdpa", backward)
    s1, n1, g1 = _packed_loss_and_grad(tiny_model_dir, batch, impl, backward)
    assert n0 == n1
    assert s1 == pytest.approx(s0, rel=1e-5)
    if backward:
        assert _rel(g1, g0) < 1e-4


def test_loss_head_inside_forward_equals_plain_loss(tiny_model_dir):
    """The hooked output layer gives the plain loss and gradients; outside the block it is normal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.train.fast_path import FastPath

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = flat_batch(_rows(tok, seed=4))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    s_ref, n_ref = loss_sum(model, batch)
    s_ref.backward()
    g_ref = model.lm_head.weight.grad.clone()  # tied with the embeddings: both paths add up
    model.zero_grad()
    head = LossHead(model.get_output_embeddings())
    s, n = loss_sum(model, batch, fast=FastPath(loss="chunked", loss_head=head))
    s.backward()
    assert n == n_ref and float(s) == pytest.approx(float(s_ref), rel=1e-5)
    assert _rel(model.lm_head.weight.grad, g_ref) < 1e-4
    with torch.no_grad():  # head inactive: ordinary logits
        out = model(input_ids=batch["input_ids"][:, :5])
    assert out.logits.shape == (1, 5, model.config.vocab_size)


def test_flat_batch_boundaries():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
            {"input_ids": [4, 5, 6, 7, 8], "labels": [4, 5, 6, 7, 8], "position_ids": [0, 1, 0, 1, 2]}]
    b = flat_batch(rows)
    assert b["cu_seq_lens"].tolist() == [0, 3, 5, 8] and b["cu_seq_lens"].dtype == torch.int32
    assert b["max_length"] == 3
    assert b["loss_index"].tolist() == [0, 1, 3, 4, 5, 6]  # a sample's first token is never a target


def _cfg(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} times 3?"},
                      {"role": "assistant", "content": f"It is {3 * i}."}]} for i in range(16)])
    base = dict(model=model, datasets=[str(data)], max_length=128, method="full", lr=3e-3, batch_size=4,
                accumulative_counts=1, max_steps=8, save_steps=100, warmup_ratio=0.0, lora_dropout=0.0, seed=0)
    base.update(kw)
    p = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.py')))}.py"
    p.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return load_config(str(p))


def _losses(work):
    return [json.loads(x)["loss"] for x in (work / "logs/train_log.jsonl").read_text().splitlines()
            if '"loss"' in x]


def test_trainer_fast_path_matches_plain_path(tmp_path, tiny_model_dir, capsys):
    """Mini-model convergence with and without the fast path: the same loss curve."""
    from lmtune.train.loop import run_training

    plain = _cfg(tmp_path, tiny_model_dir, attn_implementation="sdpa", loss_impl="plain")
    fast = _cfg(tmp_path, tiny_model_dir, attn_implementation=attn.VARLEN, loss_impl="chunked",
                gradient_checkpointing=True, method="lora", lora_r=4, lora_alpha=8, lr=1e-2)
    plain_lora = _cfg(tmp_path, tiny_model_dir, attn_implementation="sdpa", loss_impl="plain",
                      gradient_checkpointing=True, method="lora", lora_r=4, lora_alpha=8, lr=1e-2)
    fast_full = _cfg(tmp_path, tiny_model_dir, attn_implementation=attn.VARLEN, loss_impl="chunked")
    run_training(plain, tmp_path / "plain")
    run_training(fast_full, tmp_path / "fast_full")
    err = capsys.readouterr().err
    assert "fast path: attention: lmtune_varlen (set in the config); loss: chunked" in err
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "fast_full")
    assert a == pytest.approx(b, rel=2e-4) and a[-1] < a[0] - 0.5
    run_training(plain_lora, tmp_path / "plain_lora")
    run_training(fast, tmp_path / "fast_lora")
    a, b = _losses(tmp_path / "plain_lora"), _losses(tmp_path / "fast_lora")
    assert a == pytest.approx(b, rel=2e-4) and a[-1] < a[0]
    # The export is an ordinary model: no lmtune attention name leaks into it.
    cfg_json = json.loads((tmp_path / "fast_full/hf/config.json").read_text())
    assert "lmtune" not in json.dumps(cfg_json)


def test_auto_choices_on_cpu_are_the_plain_path(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lmtune.train import fast_path

    cfg = _cfg(tmp_path, tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fp = fast_path.setup_base_model(model, cfg, torch.device("cpu"), None)
    fp = fast_path.finish(fp, model, cfg, torch.device("cpu"))
    assert (fp.attention, fp.loss, fp.kernels, fp.compile) == ("sdpa", "plain", "none", False)
    assert all(fp.why[k] for k in ("attention", "loss", "kernels", "compile", "checkpointing"))


def test_forced_liger_without_gpu_is_a_clear_error(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lmtune.train import fast_path

    cfg = _cfg(tmp_path, tiny_model_dir, use_liger_kernel="on")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError) as e:
        fast_path.setup_base_model(model, cfg, torch.device("cpu"), None)
    assert "use_liger_kernel" in str(e.value) and "CPU" in str(e.value)


# ----------------------------------------------------------------------------- issue 16: fused LoRA, micro-batches by tokens


def _peft_pair(quant="none", dropout=0.0, bias=True, dtype=torch.float64):
    """The same two-layer model with peft's LoRA layers and with lmtune's fused ones, equal weights."""
    import copy

    from peft import LoraConfig, get_peft_model

    from lmtune.models.lora_fused import fused_modules

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias), torch.nn.Tanh(), torch.nn.Linear(40, 24, bias=False))
    base = base.to(dtype)
    models = []
    for fused in (False, True):
        cfg = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["0", "2"])
        if fused:
            cfg._register_custom_module(fused_modules(quant))
        models.append(get_peft_model(copy.deepcopy(base), cfg))
    g = torch.Generator().manual_seed(1)
    for name, p in models[0].named_parameters():  # B = 0 at init would hide errors in the B path
        if "lora" in name:
            p.data = torch.randn(p.shape, generator=g, dtype=p.dtype)
    models[1].load_state_dict(models[0].state_dict())
    return models


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_layer_equals_peft_fwd_bwd_float64(dropout):
    """Output, input gradient and LoRA gradients of the fused layer equal peft's (float64; with
    dropout the same mask is drawn in both from the same seed)."""
    plain, fused = _peft_pair(dropout=dropout)
    assert type(fused.base_model.model[0]).__name__ == "FusedLoraLinear"
    outs = []
    for m in (plain, fused):
        m.train()
        x = torch.randn(3, 7, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        torch.manual_seed(9)
        y = m(x)
        (y * torch.linspace(-1, 1, 24, dtype=torch.float64)).sum().backward()
        outs.append((y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (y0, gx0, g0), (y1, gx1, g1) = outs
    assert _rel(y1, y0) < 1e-12 and _rel(gx1, gx0) < 1e-12
    assert set(g0) == set(g1) and all(_rel(g1[k], g0[k]) < 1e-12 for k in g0)


def test_fused_lora_bf16_autocast_keeps_fp32_adapter_grads_and_falls_back_when_merged():
    plain, fused = _peft_pair(dtype=torch.float32)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(3))
    res = []
    for m in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
        res.append((y.float(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert res[1][0].dtype == torch.float32
    assert _rel(res[1][0], res[0][0]) < 2e-2
    assert all(g.dtype == torch.float32 and _rel(g, res[0][1][k]) < 3e-2 for k, g in res[1][1].items())
    # Merged or disabled adapters take peft's own forward: the same output as peft's.
    with torch.no_grad():
        for m in (plain, fused):
            m.merge_adapter()
        assert _rel(fused(x), plain(x)) < 1e-6
        for m in (plain, fused):
            m.unmerge_adapter()
        with fused.disable_adapter(), plain.disable_adapter():
            assert _rel(fused(x), plain(x)) < 1e-6


def test_fused_lora_on_nf4_base_equals_peft():
    """QLoRA: the fused layer on a bitsandbytes NF4 base gives peft's output and gradients."""
    bnb = pytest.importorskip("bitsandbytes")  # an optional extra; on CPU its NF4 layers run

    from peft import LoraConfig, get_peft_model

    from lmtune.models.lora_fused import fused_modules

    torch.manual_seed(0)
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    models = []
    for fused in (False, True):
        m = torch.nn.Sequential(bnb.nn.Linear4bit(32, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                                  quant_storage=torch.bfloat16))
        m[0].weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                        quant_storage=torch.bfloat16)._quantize("cpu")
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
        if fused:
            cfg._register_custom_module(fused_modules("nf4"))
        models.append(get_peft_model(m, cfg))
    models[1].load_state_dict({k: v for k, v in models[0].state_dict().items() if "lora" in k}, strict=False)
    assert type(models[1].base_model.model[0]).__name__ == "FusedLoraLinear4bit"
    res = []
    for m in models:
        x = torch.randn(6, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
        res.append((y.float(), x.grad.float(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert _rel(res[1][0], res[0][0]) < 1e-2 and _rel(res[1][1], res[0][1]) < 1e-2
    assert all(_rel(g, res[0][2][k]) < 1e-2 for k, g in res[1][2].items())


def test_micro_batches_by_tokens_keep_the_rows_of_the_step():
    from lmtune.train.batch import micro_batches

    rows = [{"input_ids": [0] * n} for n in (50, 10, 70, 30, 90, 20, 40, 60)]
    plain = micro_batches(rows, 2, 2, world=2, rank=1)
    assert plain == [rows[2:4], rows[6:8]]  # rank 1's rows, batch_size at a time
    groups = micro_batches(rows, 2, 2, world=2, rank=1, batch_tokens=100)
    assert sorted(len(r["input_ids"]) for g in groups for r in g) == [30, 40, 60, 70]  # the same rows
    assert all(sum(len(r["input_ids"]) for r in g) <= 100 for g in groups) and len(groups) == 2
    alone = micro_batches(rows, 4, 2, world=1, rank=0, batch_tokens=60)  # longer rows go alone
    assert [[len(r["input_ids"]) for r in g] for g in alone] == [[90], [70], [60], [50, 10], [40, 20], [30]]


def test_batch_tokens_refused_where_processes_must_match(tmp_path, tiny_model_dir):
    with pytest.raises(UserError) as e:
        _cfg(tmp_path, tiny_model_dir, batch_tokens=4096, strategy="fsdp2")
    assert "batch_tokens" in str(e.value) and "fsdp2" in str(e.value)
    with pytest.raises(UserError):
        _cfg(tmp_path, tiny_model_dir, gradient_checkpointing="sometimes")
    assert _cfg(tmp_path, tiny_model_dir, batch_tokens="auto").gradient_checkpointing == "auto"


def test_trainer_fused_lora_and_token_micro_batches_give_the_same_losses(tmp_path, tiny_model_dir):
    """LoRA with peft's layers and batch_size-row micro-batches, against the fused layers with
    micro-batches regrouped by a token budget: the same loss curve (fp32 on the CPU)."""
    from lmtune.train.loop import run_training

    common = dict(method="lora", lora_r=4, lora_alpha=8, lr=1e-2, accumulative_counts=2, batch_size=2,
                  pack_to_max_length=False)
    ref = _cfg(tmp_path, tiny_model_dir, lora_impl="peft", **common)
    new = _cfg(tmp_path, tiny_model_dir, lora_impl="fused", batch_tokens=40, **common)
    run_training(ref, tmp_path / "ref")
    run_training(new, tmp_path / "new")
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "new")
    assert a == pytest.approx(b, rel=1e-4) and a[-1] < a[0]
