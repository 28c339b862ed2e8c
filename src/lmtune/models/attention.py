"""Variable-length attention over packed rows, registered with transformers' AttentionInterface.

lmtune trains padding-free: a micro-batch is one row (1, T) holding several samples back to back,
with `position_ids` restarting at 0 for each. Attention must stay inside each sample. transformers'
default (sdpa/eager) does that with a dense (T × T) block-diagonal mask: correct, but it costs
T² memory and lets SDPA fall back to its slower masked kernels. The functions here do the same
attention from the sample boundaries alone (`cu_seq_lens`, computed on the CPU by `flat_batch`
and passed through the model's forward as the standard `cu_seq_lens_q/k`, `max_length_q/k`
keyword arguments):

- "lmtune_varlen": PyTorch's `torch.nn.attention.varlen.varlen_attn` (a FlashAttention kernel,
  CUDA, bf16/fp16). On the CPU, or for inputs it does not take, a per-sample SDPA loop gives the
  same result (the reference the tests compare against).
- "lmtune_flex": FlexAttention with a document mask (block-sparse: no work on cross-sample blocks).

No mask function is registered for these names on purpose: transformers then builds no mask at
all (the boundaries say everything), which also skips its packed-sequence detection, a host
sync per forward. Calls without `cu_seq_lens` (generation, probes) go to transformers' own SDPA
function, so the same model still generates normally.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

VARLEN = "lmtune_varlen"
FLEX = "lmtune_flex"


def packing_kwargs(batch: dict) -> dict:
    """The standard transformers keyword arguments that describe a packed row's samples."""
    cu, m = batch["cu_seq_lens"], int(batch["max_length"])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- kernels on (T, H, D)


def reference_varlen(q, k, v, cu, scale, window: int | None = None):
    """Per-sample causal SDPA. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        if window is not None and b - a > window:
            i = torch.arange(b - a, device=q.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


_VARLEN_PARAMS: set | None = None


def _torch_varlen(q, k, v, cu, max_len, scale, window: int | None = None):
    global _VARLEN_PARAMS
    from torch.nn.attention.varlen import varlen_attn

    if _VARLEN_PARAMS is None:
        _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
    kw = {"scale": scale}
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.11: (-1, 0) is causal
        kw["window_size"] = (window - 1 if window else -1, 0)
    else:  # torch 2.10
        if window:
            raise NotImplementedError("sliding-window attention needs torch >= 2.11 varlen_attn")
        kw["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


# The last block mask and the boundaries tensor it was built from. Every layer of a forward gets
# the same `cu` tensor object, so the mask is built once per micro-batch. The cache matches on that
# object itself (and its in-place version counter), never on its address: it keeps `cu` alive, so
# no later micro-batch's boundaries can be allocated at that address and pass for it; and reading
# the values instead would cost a device-to-host sync in every layer.
_FLEX_CACHE: dict = {}


def _cached_flex_mask(cu, T: int, window, device):
    c = _FLEX_CACHE
    if c.get("cu") is cu and c.get("version") == cu._version and c.get("key") == (T, window, device):
        return c["mask"]
    return None


def _flex(q, k, v, cu, scale, window: int | None = None):
    """FlexAttention with a document + causal mask; the block mask is built once per micro-batch."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.shape[0]
    mask = _cached_flex_mask(cu, T, window, q.device)
    if mask is None:
        doc = torch.zeros(T, dtype=torch.int32, device=q.device)
        doc[cu[1:-1].long()] = 1
        doc = doc.cumsum(0)

        def document_causal(b, h, qi, ki):
            ok = (doc[qi] == doc[ki]) & (qi >= ki)
            if window:
                ok = ok & (qi - ki < window)
            return ok

        mask = create_block_mask(document_causal, None, None, T, T, device=q.device)
        _FLEX_CACHE.update(cu=cu, version=cu._version, key=(T, window, q.device), mask=mask)
    fn = flex_attention
    if q.is_cuda:
        fn = _compiled_flex()
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask,
             scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


_COMPILED_FLEX = None


def _compiled_flex():
    # FlexAttention is only fast once compiled into a fused kernel.
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


# ----------------------------------------------------------------------------- transformers glue


def _packed_attention(backend: str):
    def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if (cu is None or attention_mask is not None or query.shape[0] != 1
                or query.shape[2] != key.shape[2] or (dropout and module.training)):
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, sliding_window=sliding_window, **kwargs)
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        # (1, H, T, D) -> (T, H, D), the token-major layout varlen kernels take.
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
        window = sliding_window if sliding_window else None
        if backend == VARLEN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            out = _torch_varlen(q, k, v, cu, int(kwargs.get("max_length_q") or q.shape[0]), scale, window)
        elif backend == FLEX:
            out = _flex(q, k, v, cu, scale, window)
        else:
            out = reference_varlen(q, k, v, cu, scale, window)
        return out[None], None  # (1, T, H, D), as transformers' attention functions return

    attention_forward.__name__ = f"{backend}_attention_forward"
    return attention_forward


varlen_attention_forward = _packed_attention(VARLEN)
flex_attention_forward = _packed_attention(FLEX)


def register() -> None:
    """Make "lmtune_varlen" and "lmtune_flex" valid `attn_implementation` names (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(FLEX, flex_attention_forward)
