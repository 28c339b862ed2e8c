"""The vision-language model kind: a LLaVA composed from a causal LM and a vision tower, or an
existing Hugging Face vision-language model.

    composed  `model` (any causal LM lmtune loads: Llama, Qwen, InternLM2, the embedded SmolLM2)
              + `vision_tower` (a CLIP or SigLIP model) + a 2-layer MLP projector, assembled as a
              transformers `LlavaForConditionalGeneration` (the LLM and the tower are moved into it,
              not copied), so training, export and plain transformers all see one standard model.
              The tokenizer gains an `<image>` token; the processor is a `LlavaProcessor`.
    existing  a folder or hub id that `AutoModelForImageTextToText` loads (LLaVA-1.5 / NeXT,
              Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, ...), with its own `AutoProcessor`.

The model has three parts, each frozen or trained on its own: the LLM (`train_llm`, by `method`:
LoRA / QLoRA / full), the vision tower (`train_vision_tower`: frozen / lora / full) and the
projector (`train_projector`). `vision_stage = "pretrain"` trains only the projector.

Images travel through the data side as references; `image_tokens` tells the tokenizer what an
image becomes in the token stream and `vision_inputs` turns a micro-batch's images into the
tensors the model's forward takes (pixel values, grid sizes, Qwen2-VL's 3-D positions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lmtune.data.images import IMAGE_PLACEHOLDER, PARTS_MARK, ImageTokens, load_image
from lmtune.errors import UserError


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

# Where each family keeps its parts (prefixes of parameter names of the ...ForConditionalGeneration
# model). The projector is matched before the tower: Qwen2-VL's merger sits inside its tower.
PARTS = {
    "llava": {"projector": ("model.multi_modal_projector",), "tower": ("model.vision_tower",),
              "llm": ("model.language_model", "lm_head")},
    "llava_next": {"projector": ("model.multi_modal_projector", "model.image_newline"),
                   "tower": ("model.vision_tower",), "llm": ("model.language_model", "lm_head")},
    "qwen2_vl": {"projector": ("model.visual.merger",), "tower": ("model.visual",),
                 "llm": ("model.language_model", "lm_head")},
    "idefics3": {"projector": ("model.connector",), "tower": ("model.vision_model",),
                 "llm": ("model.text_model", "lm_head")},
}
PARTS["qwen2_5_vl"] = PARTS["qwen2_vl"]
PARTS["smolvlm"] = PARTS["idefics3"]
# What the processor expects in place of one image, when the chat template does not write it.
PLACEHOLDERS = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
TOWER_CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel",
                 "clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
                 "siglip2_vision_model": "Siglip2VisionModel"}


# --------------------------------------------------------------------------- what a model is


def read_model_config(name_or_path: str) -> dict | None:
    """config.json of a model folder (or hub id) as a dict; None when there is none to read."""
    from lmtune.models.loader import _read_config, resolve_model_path

    path = resolve_model_path(name_or_path)
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():  # its base's
        return read_model_config(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
    if folder.is_dir():
        return _read_config(path)
    from transformers import AutoConfig

    for offline in (True, False):  # a hub id: the local HF cache first, then the hub
        try:
            return AutoConfig.from_pretrained(path, local_files_only=offline).to_dict()
        except Exception:  # not cached / no network / unknown id: loading the model reports it later
            continue
    return None


def is_vision_language(config: dict | None) -> bool:
    from lmtune.models.loader import is_vision_language as check

    return check(config)


def family(model) -> str:
    return getattr(base_model(model).config, "model_type", "llava")


def part_of(name: str, fam: str) -> str:
    """'llm' | 'tower' | 'projector' for a parameter or module name of a model of family `fam`."""
    name = name.replace("base_model.model.", "", 1)
    parts = PARTS.get(fam) or _guess_parts(fam)
    for part in ("projector", "tower", "llm"):
        if any(name == p or name.startswith(p + ".") for p in parts[part]):
            return part
    return "llm"


def _guess_parts(fam: str) -> dict:
    # Other image-text-to-text families name their parts much like these.
    return {"projector": ("model.multi_modal_projector", "model.connector", "model.visual.merger"),
            "tower": ("model.vision_tower", "model.vision_model", "model.visual"),
            "llm": ("model.language_model", "model.text_model", "lm_head")}


# --------------------------------------------------------------------------- composing a LLaVA


def tower_config(name_or_path: str) -> dict:
    config = read_model_config(name_or_path)
    if not config or config.get("model_type") not in TOWER_CLASSES:
        found = (config or {}).get("model_type", "no config.json")
        raise UserError(f"vision_tower '{name_or_path}' is not a CLIP or SigLIP model ({found})",
                        where="vision_tower", hint="use e.g. openai/clip-vit-large-patch14-336 or "
                                                   "google/siglip-so400m-patch14-384, or a local copy")
    return config


def load_tower(name_or_path: str, dtype="auto"):
    """The vision half of a CLIP/SigLIP checkpoint (a full CLIP folder loads its vision model)."""
    import transformers

    from lmtune.models.loader import _check_weights_present, resolve_model_path, torch_dtype

    config = tower_config(name_or_path)
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        _check_weights_present(Path(path), allow_pickle=False)
    cls = getattr(transformers, TOWER_CLASSES[config["model_type"]])
    return cls.from_pretrained(path, dtype=torch_dtype(dtype), use_safetensors=True)


def select_strategy(cfg, tower_cfg) -> str:
    """"default" drops the CLS feature (CLIP has one); SigLIP has none, so "full"."""
    if cfg.vision_select_strategy != "auto":
        return cfg.vision_select_strategy
    return "default" if getattr(tower_cfg, "model_type", "") in ("clip_vision_model",) else "full"


def image_feature_count(tower_cfg, strategy: str) -> int:
    patches = (tower_cfg.image_size // tower_cfg.patch_size) ** 2
    has_cls = tower_cfg.model_type == "clip_vision_model"
    return patches + (1 if has_cls and strategy == "full" else 0)


def add_image_token(tokenizer) -> int:
    """The `<image>` token's id, added as a special token when the tokenizer lacks it."""
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        try:  # keep the tokenizer's other special tokens special
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]},
                                         replace_extra_special_tokens=False)
        except TypeError:  # older transformers: an added token, special all the same
            tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def _grow_vocab(llm, n_tokens: int) -> None:
    """Room for the added token. New rows are the mean of the old ones (deterministic: composing the
    same LLM twice gives the same weights, so a projector trained on one fits the other)."""
    emb = llm.get_input_embeddings()
    old = emb.weight.shape[0]
    if n_tokens <= old:
        return
    llm.resize_token_embeddings(n_tokens, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings())
                      if m is not None and hasattr(m, "weight")}.values():
            w = layer.weight
            if w.dtype in (torch.float32, torch.float16, torch.bfloat16) and w.shape[0] > old:
                w[old:] = w[:old].float().mean(0).to(w.dtype)


def compose_llava(llm, tower, image_token_id: int, cfg, n_tokens: int):
    """A `LlavaForConditionalGeneration` whose language model and tower ARE `llm` and `tower`,
    with a new projector (initialised from cfg.seed)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    _grow_vocab(llm, n_tokens)
    strategy = select_strategy(cfg, tower.config)
    config = LlavaConfig(
        vision_config=tower.config, text_config=llm.config, image_token_id=image_token_id,
        projector_hidden_act=cfg.projector_hidden_act, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy, image_seq_length=image_feature_count(tower.config, strategy),
        multimodal_projector_bias=True, tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):  # an empty shell: the real parts are moved in below
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    model.lm_head = llm.get_output_embeddings()
    model.model.vision_tower = tower
    g = torch.Generator().manual_seed(cfg.seed)
    projector = LlavaMultiModalProjector(config)
    std = getattr(llm.config, "initializer_range", 0.02)
    with torch.no_grad():
        for layer in (projector.linear_1, projector.linear_2):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
            layer.bias.zero_()
    model.model.multi_modal_projector = projector.to(_float_dtype(llm))
    if llm.generation_config is not None:
        model.generation_config = llm.generation_config
    return model


def _float_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def load_projector(model, source: str) -> None:
    """Copy trained projector weights into `model` from a pretrain stage's folder or work dir."""
    from safetensors import safe_open

    from lmtune.models.loader import resolve_model_path

    folder = Path(resolve_model_path(source))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"projector '{source}' holds no .safetensors weights", where="projector",
                        hint="point projector at the hf/ folder (or work dir) of a vision_stage='pretrain' run")
    proj = base_model(model).model.multi_modal_projector
    wanted = {f"model.multi_modal_projector.{k}": p for k, p in proj.named_parameters()}
    found = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                k = key.replace("base_model.model.", "", 1)
                if k in wanted:
                    found[k] = sf.get_tensor(key)
    missing = set(wanted) - set(found)
    if missing:
        raise UserError(f"projector '{source}' has no weights for {sorted(missing)[0]}", where="projector",
                        hint="point projector at the output of a vision_stage='pretrain' run of this LLM and tower")
    with torch.no_grad():
        for k, v in found.items():
            if v.shape != wanted[k].shape:
                raise UserError(f"projector '{source}': {k} has shape {tuple(v.shape)}, this model needs "
                                f"{tuple(wanted[k].shape)}", where="projector",
                                hint="the projector was trained for another LLM or vision tower")
            wanted[k].copy_(v.to(wanted[k].dtype))


def parts_template(template_text: str) -> str:
    """A chat template that also takes content parts: an image part renders as "<image>\\n" and a
    text part as its text, so plain transformers (`processor.apply_chat_template` with
    [{"type": "image"}, {"type": "text", ...}]) renders what lmtune trained on."""
    return (
        PARTS_MARK
        + "{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [m] -%}"
        "{%- else -%}{%- set t = namespace(s='') -%}{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'text' -%}{%- set t.s = t.s + p['text'] -%}"
        "{%- elif p['type'] in ['image', 'image_url'] -%}{%- set t.s = t.s + '<image>\\n' -%}{%- endif -%}"
        "{%- endfor -%}{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': t.s}] -%}{%- endif -%}"
        "{%- endfor -%}{%- set messages = ns.msgs -%}"
        + template_text
    )


# --------------------------------------------------------------------------- the model kind


class VisionLanguage:
    """The model-kind interface of lmtune.models.kinds (load_tokenizer, load, lora_targets, add_lora,
    inputs), plus what images need (image_tokens, vision_inputs)."""

    name = "vision_language"
    head = "lm"

    def __init__(self, cfg):
        self.cfg = cfg
        self.composed = bool(cfg.vision_tower)
        self._processor = None
        self.model = None  # the loaded model (Qwen2-VL's positions need its config)

    # ---- processor and tokenizer
    def processor(self, cfg, tokenizer=None):
        if self._processor is None:
            self._processor = self._make_processor(cfg, tokenizer)
        return self._processor

    def _make_processor(self, cfg, tokenizer):
        from lmtune.models.loader import load_tokenizer, resolve_model_path

        if not self.composed:
            from transformers import AutoProcessor

            path = resolve_model_path(cfg.model)
            has_own = any((Path(path) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
            if Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file() and not has_own:
                base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
                path = resolve_model_path(base)
            proc = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            tok = proc.tokenizer
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            if not getattr(tok, "chat_template", None) and getattr(proc, "chat_template", None):
                tok.chat_template = proc.chat_template  # VLMs keep their template with the processor
            return proc
        from transformers import AutoImageProcessor, CLIPVisionConfig, LlavaProcessor, SiglipVisionConfig

        tok = tokenizer or load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        add_image_token(tok)
        tower_path = resolve_model_path(cfg.vision_tower)
        try:
            image_processor = AutoImageProcessor.from_pretrained(tower_path)
        except (OSError, ValueError) as e:
            raise UserError(f"vision_tower '{cfg.vision_tower}' has no image processor: {e}", where="vision_tower",
                            hint="the folder needs its preprocessor_config.json") from None
        tcfg = tower_config(cfg.vision_tower)
        vcfg = (CLIPVisionConfig if tcfg["model_type"].startswith("clip") else SiglipVisionConfig).from_dict(
            tcfg.get("vision_config", tcfg))
        strategy = select_strategy(cfg, vcfg)
        return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vcfg.patch_size,
                              vision_feature_select_strategy=strategy, image_token=IMAGE_PLACEHOLDER,
                              num_additional_image_tokens=1 if vcfg.model_type == "clip_vision_model" else 0)

    def load_tokenizer(self, cfg):
        return self.processor(cfg).tokenizer

    def image_tokens(self, cfg, tokenizer) -> ImageTokens:
        proc = self.processor(cfg, tokenizer)
        tok = proc.tokenizer
        if self.composed:
            from transformers import CLIPVisionConfig, SiglipVisionConfig

            tcfg = tower_config(cfg.vision_tower)
            vcfg = (CLIPVisionConfig if tcfg["model_type"].startswith("clip") else SiglipVisionConfig).from_dict(
                tcfg.get("vision_config", tcfg))
            tid = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
            n = image_feature_count(vcfg, select_strategy(cfg, vcfg))
            return ImageTokens(tid, IMAGE_PLACEHOLDER, lambda size: [tid] * n, size_dependent=False,
                               fingerprint=f"llava:{tid}:{n}")
        config = read_model_config(cfg.model) or {}
        fam = config.get("model_type", "")
        placeholder = PLACEHOLDERS.get(fam, IMAGE_PLACEHOLDER)
        token = getattr(proc, "image_token", None) or IMAGE_PLACEHOLDER
        tid = tok.convert_tokens_to_ids(token)
        plain = tok(placeholder, add_special_tokens=False)["input_ids"]
        if tid not in plain:
            raise UserError(f"the processor's image token {token!r} is not in the placeholder {placeholder!r}")
        k = plain.index(tid)

        def expand(size):
            from PIL import Image

            blank = Image.new("RGB", size)
            images = [[blank]] if fam in ("idefics3", "smolvlm") else [blank]
            ids = list(proc(text=[placeholder], images=images, add_special_tokens=False)["input_ids"][0])
            if ids[:k] != plain[:k] or (k + 1 < len(plain) and ids[len(ids) - (len(plain) - k - 1):] != plain[k + 1:]):
                raise UserError(f"the processor of '{cfg.model}' writes an image unlike its placeholder {placeholder!r}")
            return ids[k: len(ids) - (len(plain) - k - 1)]

        ip = getattr(proc, "image_processor", None)
        fingerprint = json.dumps([fam, tid, placeholder, ip.to_dict() if ip is not None else None],
                                 sort_keys=True, default=str)
        return ImageTokens(tid, placeholder, expand, size_dependent=fam not in ("llava",), fingerprint=fingerprint)

    # ---- the model
    def load(self, cfg, device: torch.device, dtype: str | None = None):
        """The model with each part frozen or trainable as the config says (before adapters).
        `dtype` overrides how the LLM is loaded ("auto": the checkpoint's own dtype)."""
        if self.composed:
            from lmtune.models.loader import _read_config, resolve_model_path

            if is_vision_language(_read_config(resolve_model_path(cfg.model))):
                raise UserError(f"model '{cfg.model}' already sees images; vision_tower composes a LLaVA from a "
                                "text-only LLM", where="vision_tower", hint="remove vision_tower to fine-tune it")
            tok = self.load_tokenizer(cfg)
            llm = self._load_existing(cfg, device, dtype)
            dtype = _float_dtype(llm) if cfg.quantization == "none" else _compute_dtype(cfg, device)
            tower = load_tower(cfg.vision_tower, dtype="float32" if dtype == torch.float32 else str(dtype)[6:])
            model = compose_llava(llm, tower, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), cfg, len(tok))
            if cfg.projector:
                load_projector(model, cfg.projector)
            if cfg.quantization != "none":  # the 4-bit LLM is placed already; the rest follows it
                model.model.vision_tower.to(device)
                model.model.multi_modal_projector.to(device)
        else:
            model = self._load_existing(cfg, device, dtype)
        self.model = model
        self.freeze(model, cfg)
        return model

    def _load_existing(self, cfg, device, dtype=None):
        """As a causal LM is loaded: fp32 on CPU and for full fine-tuning, else the checkpoint's dtype."""
        from lmtune.models.loader import load_model

        if dtype is None:
            dtype = cfg.torch_dtype
            if dtype == "auto":
                dtype = "float32" if device.type == "cpu" or cfg.method == "full" else "auto"
        return load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                          allow_pickle=cfg.allow_pickle, quantization=cfg.quantization,
                          device=str(device) if cfg.quantization != "none" else None,
                          attn_implementation=None if cfg.attn_implementation == "auto" else cfg.attn_implementation)

    def trains(self, cfg, part: str) -> str:
        """How a part trains: 'frozen' | 'lora' | 'full'."""
        if part == "llm":
            if cfg.vision_stage == "pretrain" or not cfg.train_llm:
                return "frozen"
            return "full" if cfg.method == "full" else "lora"
        if part == "tower":
            return cfg.train_vision_tower
        if cfg.train_projector == "auto":
            return "full" if self.composed or cfg.vision_stage == "pretrain" else "frozen"
        return cfg.train_projector

    def freeze(self, model, cfg) -> None:
        fam = family(model)
        for name, p in model.named_parameters():
            full = self.trains(cfg, part_of(name, fam)) == "full"
            if full and (hasattr(p, "quant_state") or not p.dtype.is_floating_point):
                raise UserError(f"'{name}' is quantized, so its part cannot be trained whole",
                                hint="train it by LoRA, or leave it frozen")
            p.requires_grad_(full)

    def lora_targets(self, cfg, model):
        """A regex over full module names: the Linear layers of every part that trains by LoRA (the
        LLM's restricted to `lora_target_modules` unless "all-linear"; never the output layer)."""
        fam = family(model)
        wanted = cfg.lora_target_modules
        short = None if wanted == "all-linear" else ({wanted} if isinstance(wanted, str) else set(wanted))
        names = []
        for name, module in base_model(model).named_modules():
            if not _is_linear(module) or name == "lm_head":
                continue
            part = part_of(name, fam)
            how = self.trains(cfg, part)
            if how != "lora":
                continue
            if part == "llm" and short is not None and name.rsplit(".", 1)[-1] not in short:
                continue
            names.append(name)
        return "^(" + "|".join(re.escape(n) for n in names) + ")$" if names else None

    def add_lora(self, model, cfg, custom_modules: dict | None = None):
        """peft's LoRA on the parts that train by LoRA, the parts that train whole as
        modules_to_save; `custom_modules`: the fast path's fused LoRA layers (as for a causal LM)."""
        from peft import LoraConfig, get_peft_model

        if cfg.lora_layers is not None:
            raise UserError("lora_layers applies to text models; a vision-language model takes LoRA on every "
                            "layer of the parts it trains by LoRA", where=cfg._source, hint="remove lora_layers")
        self.model = model
        self.freeze(model, cfg)  # also after QLoRA preparation froze everything
        targets = self.lora_targets(cfg, model)
        fam = family(model)
        full = sorted({p.split(".")[-1] for part in ("projector", "tower") if self.trains(cfg, part) == "full"
                       for p in (PARTS.get(fam) or _guess_parts(fam))[part]})
        if targets is None:  # nothing trains by LoRA (e.g. the projector-only stage): plain model
            if not any(p.requires_grad for p in model.parameters()):
                raise UserError("nothing would train: every part of the model is frozen",
                                hint="set train_llm, train_vision_tower or train_projector")
            return model
        # The tower may take its own rank (peft's per-module patterns, matched on full names).
        tower = {re.escape(p) + r"\..*": None for p in (PARTS.get(fam) or _guess_parts(fam))["tower"]}
        ranks = {k: cfg.vision_lora_r for k in tower} if cfg.vision_lora_r else {}
        alphas = {k: cfg.vision_lora_alpha for k in tower} if cfg.vision_lora_alpha else {}
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, modules_to_save=full or None, bias="none",
                          rank_pattern=ranks, alpha_pattern=alphas)
        if custom_modules:
            lora._register_custom_module(custom_modules)  # peft's dispatch hook for custom LoRA layers
        return get_peft_model(model, lora)

    # ---- batches
    def vision_inputs(self, rows: list[dict], batch: dict) -> dict:
        """Tensors for the images of a micro-batch's rows (in order), read from disk now."""
        refs = [r for row in rows for r in row.get("images", ())]
        if not refs:
            return {}
        proc = self._processor
        if proc is None:
            raise UserError("the image processor is not loaded; build the Trainer's model through the model kind")
        images = [load_image(r) for r in refs]
        fam = family(self.model) if self.model is not None else "llava"
        out = proc.image_processor(images=[images] if fam in ("idefics3", "smolvlm") else images,
                                   return_tensors="pt")
        extra = {k: out[k] for k in ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")
                 if k in out}
        if fam in ("qwen2_vl", "qwen2_5_vl"):
            if batch.get("generation"):  # generate() derives the 3-D positions from the token types
                tid = base_model(self.model).config.image_token_id
                extra["mm_token_type_ids"] = (batch["input_ids"] == tid).int()
            else:
                extra["position_ids"] = self._mrope_positions(batch, extra["image_grid_thw"])
        return extra

    def _mrope_positions(self, batch: dict, grid: torch.Tensor) -> torch.Tensor:
        """Qwen2-VL's positions for a packed row: text positions first (they mark the samples), then
        its 3-D rotary positions computed sample by sample."""
        inner = base_model(self.model).model
        tid = base_model(self.model).config.image_token_id
        ids = batch["input_ids"]
        mm = (ids == tid).int()
        bounds = batch["cu_seq_lens"].tolist()
        parts, g = [], 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            seg = mm[0, a:b]
            n_img = int(((seg[1:] == 1) & (seg[:-1] == 0)).sum()) + int(seg[:1].sum()) if b > a else 0
            pos, _ = inner.get_rope_index(ids[:, a:b], mm[:, a:b], image_grid_thw=grid[g:g + n_img] if n_img else None)
            parts.append(pos)
            g += n_img
        return torch.cat([batch["position_ids"][None], torch.cat(parts, dim=2)], dim=0)

    def inputs(self, batch: dict) -> dict:
        out = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        for k in ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask"):
            if k in batch:
                out[k] = batch[k]
        return out


def _is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _compute_dtype(cfg, device) -> torch.dtype:
    if cfg.torch_dtype in ("bfloat16", "float16"):
        return getattr(torch, cfg.torch_dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32
