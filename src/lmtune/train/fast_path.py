"""Choosing and applying the fast path: attention, loss, fused kernels, compile, checkpointing.

Every choice has a config key whose default, "auto", picks the best that is installed and safe
for this run; the run prints one line per choice saying what it took and why:

    attention      attn_implementation  "auto" | "lmtune_varlen" | "lmtune_flex" | "sdpa" | "eager" |
                                        "flash_attention_2" | ...
    loss           loss_impl            "auto" | "chunked" | "plain"
    kernels        use_liger_kernel     "auto" | "on" | "off"
    lora           lora_impl            "auto" | "fused" | "peft"
    compile        compile              False | True
    checkpointing  gradient_checkpointing "auto" | True | False, cpu_offload

`setup_base_model` runs on the freshly loaded transformers model (before LoRA is added);
`finish` runs on the final model (after LoRA) and returns the `FastPath` that `loss_sum` uses.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import torch

from lmtune.errors import UserError
from lmtune.models import attention as attn

# Model types whose RMSNorm / RoPE / SwiGLU layers liger-kernel replaces (its own list is larger;
# these are the ones whose layer layout we rely on and test).
LIGER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo2")


@dataclass
class FastPath:
    attention: str = "sdpa"
    loss: str = "plain"
    kernels: str = "none"
    lora: str = "peft"
    lora_modules: dict = field(default_factory=dict)  # peft custom-module mapping (fused LoRA layers)
    compile: bool = False
    checkpointing: str = "off"
    why: dict = field(default_factory=dict)
    loss_head: object = None  # lmtune.train.losses.LossHead when loss == "chunked"
    plan: object = None  # lmtune.train.memory.Plan when gradient_checkpointing = "auto" chose
    batch_tokens: int | None = None  # tokens per micro-batch (None: batch_size rows)

    def model_kwargs(self, batch: dict) -> dict:
        """Extra forward() keyword arguments for a flat batch (sample boundaries for varlen attention)."""
        if self.attention in (attn.VARLEN, attn.FLEX) or self.attention.startswith("flash_attention"):
            if "cu_seq_lens" in batch:
                return attn.packing_kwargs(batch)
        return {}

    def lines(self) -> list[str]:
        return [
            f"attention: {self.attention} ({self.why.get('attention', '')})",
            f"loss: {self.loss} ({self.why.get('loss', '')})",
            f"kernels: {self.kernels} ({self.why.get('kernels', '')})",
            f"lora: {self.lora} ({self.why.get('lora', '')})",
            f"micro-batch: {f'up to {self.batch_tokens} tokens' if self.batch_tokens else 'batch_size rows'} "
            f"({self.why.get('micro', '')})",
            f"compile: {'on' if self.compile else 'off'} ({self.why.get('compile', '')})",
            f"checkpointing: {self.checkpointing} ({self.why.get('checkpointing', '')})",
        ]

    def report(self, log=None) -> None:
        log = log or (lambda m: print(f"[lmtune] {m}", file=sys.stderr, flush=True))
        log("fast path: " + "; ".join(self.lines()))


# ----------------------------------------------------------------------------- choices


def choose_attention(cfg, device: torch.device, amp_dtype, model) -> tuple[str, str]:
    want = cfg.attn_implementation
    if want != "auto":
        return want, "set in the config"
    if getattr(model, "_supports_attention_backend", True) is False:
        return "sdpa", "this model's code does not take registered attention functions"
    if device.type != "cuda":
        return "sdpa", "CPU: SDPA with transformers' block-diagonal mask from position_ids (varlen kernels are GPU-only)"
    half = amp_dtype in (torch.bfloat16, torch.float16) or next(model.parameters()).dtype in (
        torch.bfloat16, torch.float16)
    if not half:
        return "sdpa", "fp32 compute: the flash kernels need bf16/fp16"
    try:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2", "flash-attn is installed: varlen over packed rows"
    except ImportError:
        pass
    if attn.torch_varlen_available():
        return attn.VARLEN, "PyTorch varlen flash kernel over packed rows: no padding, no cross-sample attention"
    if attn.flex_available():
        return attn.FLEX, "FlexAttention with a document mask (torch has no varlen_attn)"
    return "sdpa", "no varlen kernel in this torch: SDPA with a block-diagonal mask"


def choose_loss(cfg, device: torch.device, model) -> tuple[str, str]:
    from lmtune.train.losses import LossHead

    ok, reason = LossHead.supports(model)
    if cfg.loss_impl == "plain":
        return "plain", "set in the config"
    if cfg.loss_impl == "chunked":
        if not ok:
            raise UserError(f"loss_impl = 'chunked' cannot be used with this model: {reason}",
                            where=cfg._source, hint="set loss_impl = 'auto' or 'plain'")
        return "chunked", "set in the config"
    if not ok:
        return "plain", reason
    if cfg.strategy == "deepspeed" or cfg.deepspeed:
        return "plain", "DeepSpeed ZeRO-3 gathers the output weight only for its own forward"
    if device.type != "cuda":
        return "plain", "CPU: logits exist only at loss positions already; chunking saves little"
    return "chunked", "fused linear + cross-entropy in chunks: the (tokens x vocab) logits never exist"


def _language_model(model):
    """The part liger patches (a vision-language model's language model) and its model type."""
    from lmtune.models.kinds import language_model

    target = language_model(model)
    return target, getattr(getattr(target, "config", None), "model_type", None)


def choose_kernels(cfg, device: torch.device, model) -> tuple[str, str]:
    mt = _language_model(model)[1]
    if cfg.use_liger_kernel == "off":
        return "none", "set in the config"
    reason = None
    if device.type != "cuda":
        reason = "CPU run (Triton kernels need a GPU)"
    elif mt not in LIGER_TYPES:
        reason = f"no fused kernels for model type '{mt}'"
    else:
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError:
            reason = "liger-kernel is not installed (pip install liger-kernel)"
    if reason:
        if cfg.use_liger_kernel == "on":
            raise UserError(f"use_liger_kernel = 'on' but {reason}", where=cfg._source,
                            hint="set use_liger_kernel = 'auto' to use it only where it can run")
        return "none", reason
    return "liger", "liger-kernel RMSNorm, RoPE and SwiGLU (Triton)"


def choose_lora(cfg, device: torch.device) -> tuple[str, str]:
    if cfg.method != "lora":
        return "none", "full fine-tuning"
    if cfg.lora_impl == "peft":
        return "peft", "set in the config"
    reason = None
    if cfg.quantization == "int8":
        reason = "8-bit base layers keep peft's own LoRA layers"
    elif cfg.strategy == "deepspeed" or cfg.deepspeed:
        reason = "DeepSpeed partitions the base weights the fused layer reads"
    elif cfg.lora_impl == "auto" and device.type != "cuda":
        reason = "CPU: peft's LoRA layers (set lora_impl = 'fused' to use the fused layer here too)"
    if reason:
        if cfg.lora_impl == "fused":
            raise UserError(f"lora_impl = 'fused' cannot be used here: {reason}", where=cfg._source,
                            hint="set lora_impl = 'auto'")
        return "peft", reason
    why = "set in the config" if cfg.lora_impl == "fused" else (
        "the adapter runs inside the base matmul's autograd node: no fp32 copy of the input, no extra passes")
    return "fused", why


# ----------------------------------------------------------------------------- applying


def setup_base_model(model, cfg, device: torch.device, amp_dtype) -> FastPath:
    """Attention, kernels and checkpointing on the transformers model, before LoRA is added."""
    fp = FastPath()
    attn.register()
    name, why = choose_attention(cfg, device, amp_dtype, model)
    current = getattr(model.config, "_attn_implementation", None)
    if name != current:
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError, AttributeError) as e:
            if cfg.attn_implementation != "auto":
                raise UserError(f"attn_implementation '{name}' cannot be used with this model: {e}",
                                where=cfg._source, hint="set attn_implementation = 'auto'") from None
            why = f"{name} refused ({str(e)[:80]}); kept {current}"
            name = current
    fp.attention, fp.why["attention"] = name, why

    fp.kernels, fp.why["kernels"] = choose_kernels(cfg, device, model)
    if fp.kernels == "liger":
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        # liger's public entry point; it swaps these layers' forward for Triton kernels (and, for
        # RoPE, the modelling module's function), leaving weights and state-dict names unchanged.
        target, mt = _language_model(model)
        MODEL_TYPE_TO_APPLY_LIGER_FN[mt](
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
            model=target)

    fp.lora, fp.why["lora"] = choose_lora(cfg, device)
    if fp.lora == "fused":
        from lmtune.models.lora_fused import fused_modules

        fp.lora_modules = fused_modules(cfg.quantization)

    quantized = cfg.quantization != "none"
    if quantized:
        # QLoRA without a full-precision copy: peft's prepare_model_for_kbit_training would upcast
        # every non-quantized weight (embeddings, output layer, norms) to fp32 -- 4 GB for an 8B
        # Llama-3. The frozen base stays in its load dtype; autocast computes in bf16.
        for p in model.parameters():
            p.requires_grad_(False)
    want = cfg.gradient_checkpointing
    if want == "auto" and device.type != "cuda":
        fp.why["checkpointing"] = "auto on the CPU: off (activations of CPU-sized runs fit in RAM)"
        want = False
    if want:
        # Enabled on every layer now; with "auto", `finish` turns it off again on the layers the
        # memory estimate says can keep their activations.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "lora" or quantized:
            model.enable_input_require_grads()
        fp.checkpointing, fp.why["checkpointing"] = "on", "gradient_checkpointing = True: one layer's activations at a time"
        if cfg.cpu_offload is True:
            if device.type != "cuda":
                fp.why["checkpointing"] += "; cpu_offload ignored on a CPU run"
            else:
                for m in model.modules():
                    if getattr(m, "gradient_checkpointing", False):
                        m._gradient_checkpointing_func = offloaded_checkpoint
                fp.checkpointing = "on + CPU offload"
                fp.why["checkpointing"] += "; the layer inputs kept for recomputation wait in pinned CPU memory"
    elif "checkpointing" not in fp.why:
        fp.why["checkpointing"] = "gradient_checkpointing = False: fastest while activations fit"
    return fp


def finish(fp: FastPath, model, cfg, device: torch.device, amp_dtype=None) -> FastPath:
    """Loss head, the checkpointing plan and compile on the final (possibly peft-wrapped) model,
    once it is on its device."""
    fp.batch_tokens = cfg.batch_tokens if isinstance(cfg.batch_tokens, int) else None
    fp.why["micro"] = "set in the config" if fp.batch_tokens else "batch_tokens = None"
    if cfg.batch_tokens == "auto" and device.type != "cuda":
        fp.why["micro"] = "batch_tokens = 'auto' on the CPU: batch_size rows"
    elif cfg.batch_tokens == "auto" and (cfg.strategy in ("fsdp2", "deepspeed") or cfg.deepspeed):
        fp.why["micro"] = "batch_tokens = 'auto': batch_size rows (FSDP2/DeepSpeed run the same micro-batches everywhere)"
        cfg = dataclasses.replace(cfg, batch_tokens=None)
    if device.type == "cuda" and "auto" in (cfg.gradient_checkpointing, cfg.batch_tokens):
        plan_memory(fp, model, cfg, device, amp_dtype)
    fp.loss, fp.why["loss"] = choose_loss(cfg, device, model)
    if fp.loss == "chunked":
        from lmtune.train.losses import LossHead

        fp.loss_head = LossHead(model.get_output_embeddings())
    if cfg.compile:
        if device.type != "cuda":
            fp.why["compile"] = "compile = True ignored on a CPU run"
        else:
            from lmtune.models.kinds import decoder_layers

            layers = decoder_layers(model)
            for layer in layers:
                layer.compile(dynamic=True)
            fp.compile = bool(layers)
            fp.why["compile"] = f"torch.compile of each of {len(layers)} decoder layers (regional: compiles once)"
    else:
        fp.why["compile"] = "compile = False: the fused kernels above already cover the memory-bound ops"
    return fp


def plan_memory(fp: FastPath, model, cfg, device: torch.device, amp_dtype) -> None:
    """batch_tokens = "auto": the largest micro-batch that fits with the checkpointing asked for
    (none for "auto"/False); gradient_checkpointing = "auto": checkpoint only the layers the memory
    estimate needs, fewest first (lmtune.train.memory)."""
    import torch.distributed as torch_dist

    from lmtune.models.kinds import base_model, decoder_layers
    from lmtune.train import memory

    layers = [m for m in decoder_layers(model) if hasattr(m, "gradient_checkpointing")]
    several = torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1
    if not layers or several:
        why = "this model's layers cannot be checkpointed one by one" if not layers else (
            "several processes: the estimate is for one unsharded process")
        if cfg.gradient_checkpointing == "auto":
            fp.why["checkpointing"] = f"auto: every layer ({why})"
        if cfg.batch_tokens == "auto":
            fp.why["micro"] = f"batch_tokens = 'auto': batch_size rows ({why})"
        return
    config = base_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # a VLM's LLM
    emb = base_model(model).get_input_embeddings()
    fp32_stream = amp_dtype is not None and getattr(emb, "weight", None) is not None and emb.weight.dtype == torch.float32
    per_token = memory.activation_bytes_per_token(config, liger=fp.kernels == "liger", fp32_stream=fp32_stream,
                                                  lora_dropout=cfg.lora_dropout if cfg.method == "lora" else 0.0)
    state = {"adamw": 2.0, "sgd": 0.0}.get(cfg.optimizer, 0.5)  # 8-bit states: a quarter of fp32's two
    est = memory.Estimate(model, layers, per_token=per_token, hidden=config.hidden_size,
                          budget=memory.available_bytes(device), optimizer_state_factor=state, autocast_dtype=amp_dtype)
    offload = None if cfg.cpu_offload == "auto" else cfg.cpu_offload
    if cfg.batch_tokens == "auto":
        fp.batch_tokens = est.max_tokens(len(layers) if cfg.gradient_checkpointing is True else 0,
                                         cfg.max_length, max(cfg.max_length, 32768), offload=offload is True)
        fp.why["micro"] = "batch_tokens = 'auto': the most the memory estimate fits"
    tokens = max(fp.batch_tokens, cfg.max_length) if fp.batch_tokens else cfg.batch_size * cfg.max_length
    if cfg.gradient_checkpointing != "auto":
        return
    plan = est.plan(tokens, offload)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < plan.checkpointed
        if plan.offload and i < plan.checkpointed:
            layer._gradient_checkpointing_func = offloaded_checkpoint
    if plan.offload and "offload" not in fp.checkpointing:
        fp.checkpointing += " + CPU offload"
    if plan.checkpointed == 0:
        fp.checkpointing = "off"
        if cfg.method == "lora" or cfg.quantization != "none":
            base_model(model).disable_input_require_grads()
    elif plan.checkpointed < plan.layers:
        fp.checkpointing = fp.checkpointing.replace("on", f"{plan.checkpointed}/{plan.layers} layers")
    fp.why["checkpointing"] = "auto: " + plan.describe(tokens)
    fp.plan = plan


# ----------------------------------------------------------------------------- checkpoint offload


class _OffloadedCheckpoint(torch.autograd.Function):
    """Activation checkpointing whose saved input waits in pinned CPU memory.

    Forward: copy the layer input to the CPU on a side stream (overlapping the next layers), run
    the layer without keeping its activations. Backward: the input comes back (prefetched on the
    side stream while the layer after it was being back-propagated), the layer is re-run with
    autograd and back-propagated (parameter gradients accumulate as usual). Autocast and RNG
    state are replayed so the recomputation matches the original forward (dropout included).
    """

    @staticmethod
    def forward(ctx, run, hidden, *rest):
        global _LAST
        ctx.run, ctx.rest = run, rest
        ctx.device = hidden.device
        ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        ctx.rng = torch.cuda.get_rng_state(hidden.device)
        side = _side_stream(hidden.device)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        cpu = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
        with torch.cuda.stream(side):
            cpu.copy_(hidden, non_blocking=True)
        hidden.record_stream(side)  # the allocator keeps `hidden` until the copy is done
        ctx.cpu_hidden, ctx.gpu_hidden, ctx.ready = cpu, None, None
        ctx.prev, _LAST = _LAST, ctx
        with torch.no_grad():
            out = run(hidden, *rest)
        return out.detach() if torch.is_tensor(out) else out[0].detach()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.gpu_hidden is None:
            _fetch(ctx)
        torch.cuda.current_stream(ctx.device).wait_event(ctx.ready)
        hidden = ctx.gpu_hidden.requires_grad_(True)
        ctx.gpu_hidden = None
        prev = ctx.prev
        ctx.prev = None
        if prev is not None and prev.cpu_hidden is not None and prev.gpu_hidden is None:
            _fetch(prev)  # the layer before this one is back-propagated next: bring its input now
        saved_rng = torch.cuda.get_rng_state(ctx.device)
        torch.cuda.set_rng_state(ctx.rng, ctx.device)
        try:
            with torch.enable_grad(), torch.autocast("cuda", enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
                out = ctx.run(hidden, *ctx.rest)
            out = out if torch.is_tensor(out) else out[0]
        finally:
            torch.cuda.set_rng_state(saved_rng, ctx.device)
        torch.autograd.backward(out, grad_out)
        return (None, hidden.grad) + (None,) * len(ctx.rest)


_LAST = None
_SIDE: dict = {}


def _side_stream(device):
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def _fetch(ctx) -> None:
    side = _side_stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        ctx.gpu_hidden = ctx.cpu_hidden.to(ctx.device, non_blocking=True)
        ctx.ready = torch.cuda.Event()
        ctx.ready.record(side)
    ctx.gpu_hidden.record_stream(torch.cuda.current_stream(ctx.device))
    ctx.cpu_hidden = None


def offloaded_checkpoint(run, hidden, *rest, **kwargs):
    """A `_gradient_checkpointing_func` for transformers layers (hidden states come first)."""
    if kwargs:
        import functools

        run = functools.partial(run, **kwargs)
    return _OffloadedCheckpoint.apply(run, hidden, *rest)
