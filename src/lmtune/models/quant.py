"""bitsandbytes (4-bit NF4 / 8-bit) helpers for training with quantized base weights (QLoRA).

The CPU inference-layout trap
-----------------------------
On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks a layer's 4-bit weight into
an inference-only layout the first time it sees eval mode with an input that does not require
grad (exactly what `generate()` under `torch.no_grad()` does). The repacking is permanent: it
sets `quant_state.packing_format_for_cpu`, and from then on `matmul_4bit` sends every call of
that layer, in training too, to the inference kernel `gemv_4bit`, which has no backward. The
base layer's output is then cut from its input in the autograd graph, so every LoRA weight below
it gets a wrong (often zero) gradient, and nothing warns.

`trainable_layout(model)` keeps a quantized model trainable across an in-training generation:
it switches the repacking off for its duration (the layer's own `support_avx512bf16_for_cpu`
switch, read by that same `forward`) and afterwards checks that no layer was repacked anyway; a
layer that was is unpacked again (bitsandbytes' own inverse, also what its `state_dict()` does).
"""

from __future__ import annotations

import contextlib
import logging

# The one bitsandbytes log line hidden from users. On a CPU with AVX512-BF16, importing bitsandbytes
# (which `import peft` does too) tries to fetch a faster 4-bit CPU kernel from the Hugging Face hub
# through the optional `kernels` package and, when that is missing, logs this warning from
# bitsandbytes.backends.cpu.ops. bitsandbytes then uses its own CPU kernels, which is what lmtune is
# tested with: nothing is wrong and nothing needs doing, so the line is only noise on every command.
_CPU_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


class _HideCpuKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CPU_KERNEL_NOTICE)


def hide_bitsandbytes_noise() -> None:
    """Drop exactly that warning (idempotent; must run before bitsandbytes is first imported, so the
    package root calls it). Every other bitsandbytes message still shows."""
    logger = logging.getLogger(_CPU_OPS_LOGGER)
    if not any(isinstance(f, _HideCpuKernelNotice) for f in logger.filters):
        logger.addFilter(_HideCpuKernelNotice())


def _linear4bit_class():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def quantized_linears(model) -> list:
    """The bitsandbytes 4-bit linear layers of `model` (empty without bitsandbytes)."""
    cls = _linear4bit_class()
    if cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def is_inference_packed(layer) -> bool:
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def restore_trainable_layout(model) -> int:
    """Unpack every 4-bit layer that bitsandbytes repacked for CPU inference; returns how many."""
    layers = [m for m in quantized_linears(model) if is_inference_packed(m)]
    if not layers:
        return 0
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError:  # a bitsandbytes without the inverse: refuse rather than train wrongly
        raise RuntimeError(
            f"{len(layers)} 4-bit layers were repacked into bitsandbytes' CPU inference layout, in which "
            "LoRA gradients are wrong, and this bitsandbytes cannot undo it; pin bitsandbytes==0.50.2"
        ) from None
    import torch

    with torch.no_grad():
        for layer in layers:
            layer.weight.data, layer.weight.quant_state = unpack(layer.weight.data, layer.weight.quant_state)
            if getattr(layer, "quant_state", None) is not None:
                layer.quant_state = layer.weight.quant_state
    return len(layers)


@contextlib.contextmanager
def trainable_layout(model):
    """Run inference (e.g. `generate`) on a quantized model that training continues on afterwards."""
    layers = quantized_linears(model)
    saved = [(m, m.__dict__.get("support_avx512bf16_for_cpu")) for m in layers
             if "support_avx512bf16_for_cpu" in m.__dict__]
    for m, _ in saved:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, value in saved:
            m.support_avx512bf16_for_cpu = value
        restore_trainable_layout(model)


def is_quantized_param(p) -> bool:
    """A bitsandbytes-quantized (frozen) weight: it can be neither trained nor sharded by FSDP."""
    return type(p).__name__ in ("Params4bit", "Int8Params")
