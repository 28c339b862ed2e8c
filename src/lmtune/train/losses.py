"""Linear + cross-entropy without the full logits.

The output layer of a modern LM is large (Llama-3: 128,256 × 4,096). Materialising its logits for
every loss position costs `positions × vocab` floats twice (the logits and their gradient): 4 GB in
bf16 for 16k positions of Llama-3, and more again once upcast to fp32 for the softmax.

`linear_cross_entropy` computes the summed cross-entropy chunk by chunk: for each block of rows it
forms the logits in fp32, takes the log-sum-exp, turns them in place into the gradient
(softmax − one-hot) and immediately contracts that with the weight and the hidden states. Only one
chunk of logits exists at a time; the gradients of the hidden states (and of the weight, when it
is trainable) are finished in the forward pass and merely scaled in the backward pass, so nothing
is recomputed.

`linear_token_logprobs` is the same idea for objectives that need each target token's
log-probability rather than one sum (preference optimisation sums them per sequence): the output
is a vector, so the gradient of each row is scaled by its own upstream gradient in the backward
pass. With a frozen output layer (LoRA) the unscaled hidden-state gradient is still finished in
the forward pass; when the output layer trains, the backward pass recomputes the logits chunk by
chunk instead of keeping any of them.

`LossHead` attaches both to a model without touching its code: two hooks on the output layer
(found with `get_output_embeddings()`) swap the layer's matmul for the fused computation while a
`with head.targets(t):` (summed cross-entropy) or `with head.token_logprobs(t):` (per-token
log-probabilities) block is active, so it runs inside the model's own forward (peft, DDP and
FSDP2 see an ordinary forward call).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE = -100


def _chunk_rows(vocab: int) -> int:
    # About 2^27 fp32 logits (512 MB) per chunk: large matmuls, bounded memory.
    rows = (1 << 27) // max(1, vocab)
    return max(128, min(8192, rows // 128 * 128 or 128))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk):
        n, _ = hidden.shape
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        h_all = hidden.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # fp32 (fp64 in the tests)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, n, chunk):
            h = h_all[start:start + chunk]
            t = targets[start:start + chunk]
            logits = F.linear(h, w, b).to(acc)  # (c, V) fp32: the only logits alive
            valid = t != IGNORE
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_h or need_w or need_b:
                # d(loss)/d(logits) = softmax - onehot, computed in place in the logits buffer.
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(grad[:, :1]))
                grad.mul_(valid[:, None])
                g = grad.to(compute_dtype)
                del logits, grad
                if need_h:
                    grad_h[start:start + chunk] = (g @ w).to(hidden.dtype)
                if need_w:
                    grad_w += g.t() @ h  # bf16 product, fp32 accumulation over chunks
                if need_b:
                    grad_b += g.to(acc).sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(wdt) if grad_w is not None else None
        gb = (grad_b * grad_out).to(bdt) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets), never holding all logits.

    hidden (n, H), weight (V, H), targets (n,) with -100 for ignored rows. Under autocast the
    matmuls run in the autocast dtype (as `nn.Linear` would); softmax and sums are fp32.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = hidden.dtype
    chunk = chunk or _chunk_rows(weight.shape[0])
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                         targets.reshape(-1), compute_dtype, chunk)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk):
        n, _ = hidden.shape
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        h_all = hidden.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse_all = torch.empty(n, dtype=acc, device=hidden.device)
        # Frozen output layer: d(logp)/d(hidden) per row is finished here, scaled in backward.
        early = need_h and not (need_w or need_b)
        grad_h = torch.empty_like(hidden) if early else None
        for start in range(0, n, chunk):
            t = targets[start:start + chunk]
            logits = F.linear(h_all[start:start + chunk], w, b).to(acc)
            valid = t != IGNORE
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            out[start:start + chunk] = (logits.gather(1, safe_t[:, None]).squeeze(1) - lse) * valid
            lse_all[start:start + chunk] = lse
            if early:
                # d(logp)/d(logits) = onehot - softmax, in place in the logits buffer.
                grad = logits.sub_(lse[:, None]).exp_().neg_()
                grad.scatter_add_(1, safe_t[:, None], torch.ones_like(grad[:, :1]))
                grad.mul_(valid[:, None])
                grad_h[start:start + chunk] = (grad.to(compute_dtype) @ w).to(hidden.dtype)
                del grad
            del logits
        if early:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.early, ctx.compute_dtype, ctx.chunk = early, compute_dtype, chunk
        ctx.needs = (need_h, need_w, need_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.early:
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_out.to(grad_h.dtype)[:, None], None, None, None, None, None
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs
        cd, chunk = ctx.compute_dtype, ctx.chunk
        acc = lse_all.dtype
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        h_all = hidden.to(cd)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h = h_all[start:start + chunk]
            t = targets[start:start + chunk]
            valid = t != IGNORE
            safe_t = torch.where(valid, t, 0)
            scale = (grad_out[start:start + chunk].to(acc) * valid)[:, None]
            grad = F.linear(h, w, b).to(acc).sub_(lse_all[start:start + chunk, None]).exp_().neg_()
            grad.scatter_add_(1, safe_t[:, None], torch.ones_like(grad[:, :1]))
            grad.mul_(scale)
            g = grad.to(cd)
            del grad
            if need_h:
                grad_h[start:start + chunk] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w += g.t() @ h
            if need_b:
                grad_b += g.to(acc).sum(0)
        gw = grad_w.to(weight.dtype) if grad_w is not None else None
        gb = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, gw, gb, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """log_softmax(hidden @ weight.T + bias)[row, target] for every row (0 for ignored rows),
    never holding all logits. hidden (n, H), weight (V, H), targets (n,). Returns (n,) in fp32
    (fp64 for fp64 inputs); autocast as in `linear_cross_entropy`."""
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    chunk = chunk or _chunk_rows(weight.shape[0])
    with torch.autocast(dev, enabled=False):
        return _LinearTokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                          targets.reshape(-1), compute_dtype, chunk)


def plain_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-row log-probability of `targets` from full logits (n, V), softmax in fp32 at least,
    a chunk of rows at a time; 0 for ignored rows."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    parts = []
    for start in range(0, logits.shape[0], chunk):
        parts.append(-F.cross_entropy(logits[start:start + chunk].to(dtype), targets[start:start + chunk],
                                      reduction="none", ignore_index=IGNORE))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=dtype)


def plain_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: full logits, fp32 cross-entropy (used by the tests)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                           ignore_index=IGNORE)


class LossHead:
    """Computes the fused loss inside the model's own forward, at its output layer.

    While `with head.targets(t):` is active, a pre-hook on the output layer takes its input (the
    final hidden states at the positions `logits_to_keep` selected) and hands the layer an empty
    slice instead; a post-hook then returns the summed loss, shaped (1, 1, 1), as the layer's
    "logits". Outside that block the layer behaves normally (generation, probes, export).
    """

    def __init__(self, output_layer: torch.nn.Linear):
        self.layer = output_layer
        self._targets: torch.Tensor | None = None
        self._per_token = False
        self._hidden: torch.Tensor | None = None
        self._handles = [
            output_layer.register_forward_pre_hook(self._pre),
            output_layer.register_forward_hook(self._post),
        ]

    @staticmethod
    def supports(model) -> tuple[bool, str]:
        """Whether the fused loss can stand in for this model's output layer, and why not."""
        try:
            layer = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is None or type(layer) is not torch.nn.Linear:
            return False, f"the output layer is {type(layer).__name__}, not a plain nn.Linear"
        cfg = getattr(model, "config", None)
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
            if cfg is not None and getattr(cfg, attr, None) not in (None, 1, 1.0):
                return False, f"the model post-processes its logits ({attr})"
        return True, ""

    @contextlib.contextmanager
    def targets(self, targets: torch.Tensor):
        self._targets = targets
        try:
            yield
        finally:
            self._targets = None
            self._hidden = None

    @contextlib.contextmanager
    def token_logprobs(self, targets: torch.Tensor):
        """Inside this block the layer returns each target's log-probability, shaped (1, n)."""
        self._per_token = True
        try:
            with self.targets(targets):
                yield
        finally:
            self._per_token = False

    def _pre(self, module, args):
        if self._targets is None:
            return None
        hidden = args[0]
        self._hidden = hidden
        return (hidden[..., :0, :],) + tuple(args[1:])

    def _post(self, module, args, output):
        if self._targets is None or self._hidden is None:
            return None
        hidden, self._hidden = self._hidden, None
        if self._per_token:
            return linear_token_logprobs(hidden, module.weight, self._targets, bias=module.bias).reshape(1, -1)
        loss = linear_cross_entropy(hidden, module.weight, self._targets, bias=module.bias)
        return loss.reshape(1, 1, 1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
