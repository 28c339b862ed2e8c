"""How much activation checkpointing a run needs: a memory estimate made once, at setup.

Checkpointing a decoder layer keeps only its input and re-runs its forward during the backward
pass: the layer's activations cost almost nothing, but the step does one more forward (about a
third more work for full fine-tuning, a half more for LoRA). So the fastest plan checkpoints as
few layers as the memory allows. `plan_checkpointing` estimates

    static      what is allocated now (weights, adapters) + gradients and optimizer state to come
    per layer   what one layer keeps for backward for a micro-batch of `tokens` tokens
    transients  the loss chunk, one layer's backward, allocator slack

against the memory this process may use (free device memory, capped by
`torch.cuda.set_per_process_memory_fraction` when that is set) and returns the smallest number of
checkpointed layers that fits. The per-token figures count the tensors a Llama-style layer keeps
in bf16 with the fused kernels (RMSNorm input and output, q/k/v, attention output, gate/up and
their product; tests/gpu checks the estimate against the measured peak on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass
class Plan:
    checkpointed: int  # layers that recompute their forward (the first ones)
    layers: int
    offload: bool  # their inputs wait in pinned CPU memory
    need_gib: float  # estimated peak with this plan
    budget_gib: float
    fits: bool

    def describe(self, tokens: int) -> str:
        which = ("no layer" if self.checkpointed == 0 else "every layer" if self.checkpointed == self.layers
                 else f"{self.checkpointed} of {self.layers} layers")
        tail = "" if self.fits else " (does not fit even with every layer checkpointed: expect out-of-memory)"
        which += ", inputs offloaded to CPU" if self.offload and self.checkpointed else ""
        return (f"{which} (memory estimate for {tokens} tokens per micro-batch: {self.need_gib:.1f} GiB of "
                f"{self.budget_gib:.1f} GiB available){tail}")


def activation_bytes_per_token(config, *, liger: bool, lora_dropout: float = 0.0, fp32_stream: bool = False) -> int:
    """Bytes one decoder layer keeps for backward per token (bf16 activations; `fp32_stream`: fp32
    weights under bf16 autocast, where the residual stream and the norms stay fp32 and each matmul
    keeps its own bf16 copy of a norm's output)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * hd
    q = heads * hd
    inter = getattr(config, "intermediate_size", None) or 4 * h
    n_exp = getattr(config, "num_experts_per_tok", None)
    if n_exp and getattr(config, "moe_intermediate_size", None):
        inter = config.moe_intermediate_size * n_exp
    # norm1 in/out, q/k/v, attention out, norm2 in/out, gate, up, their product; + softmax stats
    elems = 4 * h + 2 * q + 2 * kv + 3 * inter
    extra = 4 * heads
    if not liger:  # eager RMSNorm keeps fp32 copies; SiLU keeps its input apart from the product
        elems += 8 * h + inter
    if lora_dropout > 0:  # each adapter keeps its own dropped-out input (+ a 1-byte mask)
        extra += 3 * (5 * h + q + inter)
    if fp32_stream:  # the four norm tensors at 4 bytes, and two bf16 casts of the norm outputs
        extra += 12 * h
    return int(1.1 * (2 * elems + extra))


def available_bytes(device: torch.device) -> int:
    """What this process may still allocate on `device`."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    limit = total
    get_frac = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_frac is not None:
        limit = int(total * get_frac(device))
    limit = min(limit, free + torch.cuda.memory_reserved(device))
    return limit - torch.cuda.memory_allocated(device)


class Estimate:
    """The estimated peak of a step as a function of (checkpointed layers, tokens per micro-batch)."""

    def __init__(self, model, layers: list, *, per_token: int, hidden: int, budget: int,
                 optimizer_state_factor: float, autocast_dtype):
        self.layers, self.per_token, self.hidden, self.budget = layers, per_token, hidden, budget
        trainable = [p for p in model.parameters() if p.requires_grad]
        # gradients (the parameter's dtype) and optimizer state (AdamW: 2 values per parameter)
        self.static = sum(p.numel() * p.element_size() * (1 + optimizer_state_factor) for p in trainable)
        # fp32 trainable weights under bf16 autocast: each matmul keeps a bf16 copy of its weight for
        # backward (as long as the layer is not checkpointed).
        self.weight_copies = [
            0 if autocast_dtype is None else
            sum(p.numel() * 2 for p in layer.parameters() if p.requires_grad and p.dim() >= 2 and p.dtype == torch.float32)
            for layer in layers]
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        trains_out = out is not None and getattr(out, "weight", None) is not None and out.weight.requires_grad
        self.out_grad = out.weight.numel() * 4 if trains_out else 0
        self.slack = int(0.05 * budget) + int(0.75 * GIB)

    def need(self, k: int, tokens: int, offload: bool = False) -> int:
        """Bytes still to allocate at the peak with the first `k` layers checkpointed (their inputs
        offloaded to the CPU or not)."""
        full = [tokens * self.per_token + w for w in self.weight_copies]
        ckpt_input = 0 if offload else tokens * self.hidden * 2
        acts = sum(full[k:]) + k * ckpt_input + (max(full[:k]) if k else 0)
        # The loss: a chunk of fp32 logits and its bf16 gradient (~2^27 values), the hidden-state
        # gradient, an fp32 accumulator when the output layer trains. One layer's backward: about
        # its activations again.
        loss = (1 << 27) * 6 + tokens * self.hidden * 4 + self.out_grad
        return int(self.static + acts + max(loss, max(full)) + self.slack)

    def plan(self, tokens: int, offload: bool | None = None) -> Plan:
        """The fewest checkpointed layers whose estimated peak fits; offload None: their inputs stay
        on the GPU unless only offloading them fits."""
        n = len(self.layers)
        for off in ([False, True] if offload is None else [offload]):
            k = next((k for k in range(n + 1) if self.need(k, tokens, off) <= self.budget), None)
            if k is not None:
                break
        if k is None:
            k, off = n, offload is not False
        need = self.need(k, tokens, off)
        return Plan(checkpointed=k, layers=n, offload=off and k > 0, need_gib=need / GIB,
                    budget_gib=self.budget / GIB, fits=need <= self.budget)

    def max_tokens(self, k: int, low: int, high: int, offload: bool = False) -> int:
        """The most tokens per micro-batch (in [low, high], a multiple of 256) that fit with `k`
        checkpointed layers; `low` when none does."""
        def fits(t):
            return self.need(k, t, offload) <= self.budget

        if not fits(low):
            return low
        lo, hi = low, high
        while hi - lo > 256:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        best = hi if fits(hi) else lo
        return max(low, best // 256 * 256)
