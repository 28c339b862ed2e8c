"""LoRA layers whose adapter runs fused with the frozen base matmul (one autograd node per layer).

peft's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops.
With fp32 adapter weights (lmtune keeps trainable weights in fp32) it also casts `x` to fp32 first,
so every LoRA layer writes and reads an fp32 copy of its input, forward and backward; then the
scaling and the addition each make one more pass over the layer's output. For an 8B model those
memory-bound passes cost about as much time as the attention.

Here one `torch.autograd.Function` does the layer:

    forward    lora = (x_d @ A^T) @ (s B)^T              two thin GEMMs (rank r), x_d = dropout(x)
               out  = x @ W^T + lora                     the base GEMM accumulates into `lora`
    backward   gB   = (g @ B) s                          (tokens x r)
               dx   = g @ W + gB @ A                     the base GEMM accumulates into the thin one
               dA   = gB^T @ x_d,   dB = s g^T @ (x_d @ A^T)

in the compute dtype (the autocast dtype, else the input's), with no fp32 copy of activations; the
adapter weights stay fp32 and get fp32 gradients. What is kept for backward is what peft keeps
(the input, the rank-r product) and nothing else. A 4-bit base (bitsandbytes NF4) is dequantized
into a transient dense weight in forward and again in backward, as bitsandbytes itself does.

The layers subclass peft's own LoRA layers and only override `forward` (state-dict names, merge,
save and load are peft's); they are handed to peft through its custom-module dispatch
(`LoraConfig._register_custom_module`). Anything but plain single-adapter LoRA (DoRA and other
variants, several or mixed adapters, merged or disabled adapters) takes peft's own forward.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLinear


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_a, lora_b, scaling, dtype, dense):
        # x_d: the dropped-out input of the adapter, or None when it is x itself (no dropout).
        # dense(weight, dtype) -> the (out, in) base weight in the compute dtype (dequantizes 4-bit).
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        xd2 = x2 if x_d is None else x_d.reshape(-1, shape[-1]).to(dtype)
        a, bs = lora_a.to(dtype), (lora_b * scaling).to(dtype)
        xa = xd2 @ a.t()  # (n, r)
        out = xa @ bs.t()  # (n, out): the base GEMM accumulates into it
        if bias is not None:
            out.add_(bias.to(dtype))
        out = torch.addmm(out, x2, dense(weight, dtype).t())
        ctx.save_for_backward(xd2, xa, lora_a, lora_b)
        ctx.weight = weight  # a frozen parameter (alive anyway); kept as is for the 4-bit quant state
        ctx.meta = (scaling, dtype, dense, shape, x_d is None, bias, x.dtype)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xd2, xa, lora_a, lora_b = ctx.saved_tensors
        scaling, dtype, dense, shape, same_input, bias, x_dtype = ctx.meta
        need_x, need_xd, _, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        a, bs = lora_a.to(dtype), (lora_b * scaling).to(dtype)
        gb = g @ bs  # (n, r) = s (g @ B)
        dx = dxd = None
        if same_input:
            if need_x:
                dx = torch.addmm(gb @ a, g, dense(ctx.weight, dtype)).reshape(shape).to(x_dtype)
        else:
            if need_x:
                dx = (g @ dense(ctx.weight, dtype)).reshape(shape).to(x_dtype)
            if need_xd:
                dxd = (gb @ a).reshape(shape).to(x_dtype)
        da = (gb.t() @ xd2).to(lora_a.dtype) if need_a else None
        db = (g.t() @ xa).mul_(scaling).to(lora_b.dtype) if need_b else None
        dbias = g.sum(0).to(bias.dtype) if need_bias else None
        return dx, dxd, None, dbias, da, db, None, None, None


def _dense_linear(weight, dtype):
    return weight.to(dtype)


def _dense_4bit(weight, dtype):
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def lora_linear(x, x_d, weight, bias, lora_a, lora_b, scaling: float, dtype, dense=_dense_linear):
    """`x @ W^T + bias + scaling * (x_d @ A^T) @ B^T` as one autograd node (see the module doc)."""
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x, None if x_d is x else x_d, weight, bias, lora_a, lora_b, float(scaling),
                                 dtype, dense)


class _FusedForward:
    """The forward both fused classes share; `_compute_dtype` and `_dense` differ per base."""

    def _fused_adapter(self, x, args, kwargs):
        """The single plain-LoRA adapter to fuse, or None when peft's own forward must run."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
            return None
        return name

    def forward(self, x, *args, **kwargs):
        name = self._fused_adapter(x, args, kwargs)
        dtype = self._compute_dtype(x) if name is not None else None
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        x_d = self.lora_dropout[name](x)
        return lora_linear(x, x_d, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                           self.scaling[name], dtype, self._dense)


def _autocast_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class FusedLoraLinear(_FusedForward, PeftLinear):
    """peft's LoRA Linear on a plain `nn.Linear`, with the fused forward."""

    _dense = staticmethod(_dense_linear)

    def _compute_dtype(self, x):
        w = self.get_base_layer().weight
        if self.fan_in_fan_out or not x.is_floating_point():
            return None
        dtype = _autocast_dtype(x) or x.dtype
        # Outside autocast peft needs matching dtypes too; anything else keeps peft's behaviour.
        return dtype if _autocast_dtype(x) or w.dtype == x.dtype else None


def fused_modules(quantization: str) -> dict:
    """The peft custom-module mapping that puts fused layers on a model with this quantization.

    peft matches the mapping with isinstance in order, and bitsandbytes' layers subclass
    nn.Linear: the 4-bit class comes first; with 8-bit layers nothing is fused (peft's own)."""
    if quantization == "int8":
        return {}
    mapping = {}
    if quantization == "nf4":
        mapping[_bnb_linear4bit()] = _fused_4bit_class()
    mapping[torch.nn.Linear] = FusedLoraLinear
    return mapping


def _bnb_linear4bit():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


_FUSED_4BIT = None


def _fused_4bit_class():
    """peft's 4-bit LoRA layer with the fused forward (built on first use: bitsandbytes is optional)."""
    global _FUSED_4BIT
    if _FUSED_4BIT is None:
        from peft.tuners.lora.bnb import Linear4bit

        class FusedLoraLinear4bit(_FusedForward, Linear4bit):
            _dense = staticmethod(_dense_4bit)

            def _compute_dtype(self, x):
                if not x.is_floating_point():
                    return None
                dtype = _autocast_dtype(x) or self.get_base_layer().compute_dtype or x.dtype
                return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else None

        _FUSED_4BIT = FusedLoraLinear4bit
    return _FUSED_4BIT
