"""Training checkpoint -> Hugging Face folder; LoRA merge.

Every folder is written through `lmtune.atomic.atomic_dir`: under a temporary name, renamed into
place when complete, and never over a folder lmtune did not write unless `overwrite` is given.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lmtune.atomic import HF_MARKER, atomic_dir, check_not_input, check_out_dir
from lmtune.errors import UserError

META_FILE = HF_MARKER  # lmtune.json: template, system prompt, stop words; marks the folder as lmtune's
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def check_hf_out(out, overwrite: bool = False) -> str:
    """Raise a UserError now if a Hugging Face folder may not be written to `out` (see
    `lmtune.atomic.check_out_dir`): call it before slow work (loading, training)."""
    return check_out_dir(out, marker=HF_MARKER, overwrite=overwrite)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save the tokenizer so that transformers 4.x and 5.x (and the tools pinned to either) read it.

    transformers 5 writes its internal class name "TokenizersBackend" and a list-valued
    "extra_special_tokens"; 4.x knows neither. Both mean the plain fast tokenizer.
    """
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        cfg.pop("extra_special_tokens")
        cfg["additional_special_tokens"] = sorted(set(cfg.get("additional_special_tokens", [])) | set(extra))
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def _write_meta(folder: Path, cfg, template) -> None:
    meta = {
        "prompt_template": cfg.prompt_template if cfg is not None else "auto",
        "system": cfg.system if cfg is not None else None,
        "stop_words": list(template.stop_words) if template is not None else [],
        "base_model": cfg.model if cfg is not None else None,
    }
    if cfg is not None and cfg.vision_tower:  # a composed LLaVA: what it was composed from
        meta["llava"] = {"llm": cfg.model, "vision_tower": cfg.vision_tower}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")


def _generation_config(model, tokenizer, template):
    from lmtune.models.generation import stop_token_ids

    gen = getattr(model, "generation_config", None)  # None for a reward model (it does not generate)
    stops = stop_token_ids(tokenizer, template.stop_words if template is not None else [])
    if gen is not None and stops:
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
    return gen


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_trained_model(model, tokenizer, cfg, template, out, state_dict=None, max_shard_size="2GB",
                       dtype=None, overwrite: bool = False) -> Path:
    """Write a ready-to-use folder: the PEFT adapter for LoRA, the full model otherwise; plus the
    tokenizer (with its chat template), a generation config with the template's stop tokens, and
    lmtune.json (template, system prompt, stop words). `out` is replaced only if it is new, empty,
    a previous lmtune HF folder, or `overwrite` is set (check early with `check_hf_out`)."""
    out = Path(out)
    processor = None
    if cfg is not None and _sees_images(cfg):
        from lmtune.export.vision import full_precision_merge, processor_for

        processor = processor_for(cfg, tokenizer, template)
        if cfg.vision_tower:  # a composed LLaVA is always written whole (LoRA merged in)
            model = full_precision_merge(model, cfg)
    is_peft = hasattr(model, "peft_config")
    if hasattr(template, "jinja") and processor is None:
        # A named template: save it as the tokenizer's chat template, so the exported folder
        # renders conversations exactly as in training wherever it is loaded.
        tokenizer.chat_template = template.jinja()
    gen = _generation_config(_base_of(model), tokenizer, template)
    with atomic_dir(out, marker=HF_MARKER, overwrite=overwrite) as tmp:
        if is_peft:
            # state_dict: the adapter weights gathered by a sharded engine (None: read from the model)
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            # Record the base the user named (hub id or path), not a resolved cache folder.
            base_name = cfg.model if cfg is not None else None
            if base_name:
                from lmtune.models.loader import resolve_model_path

                cfg_path = tmp / "adapter_config.json"
                ac = json.loads(cfg_path.read_text())
                ac["base_model_name_or_path"] = resolve_model_path(base_name)
                cfg_path.write_text(json.dumps(ac, indent=2))
        else:
            target = model
            if dtype is not None:
                target = model.to(dtype)
            target.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size,
                                   state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(tmp)  # image processor, processor config, chat template, tokenizer
        save_tokenizer(tokenizer, tmp)  # (again) in the form transformers 4.x and 5.x both read
        if gen is not None:
            gen.save_pretrained(tmp)
        _write_meta(tmp, cfg, template)
    return out


def _sees_images(cfg) -> bool:
    from lmtune.models.kinds import model_kind

    return model_kind(cfg).name == "vision_language"


# --------------------------------------------------------------------------- pth_to_hf


def pth_to_hf(config: str | None, checkpoint: str, out: str, fp32: bool = False, max_shard_size: str = "2GB",
              save_format: str = "native", overwrite: bool = False) -> Path:
    """A training checkpoint (work_dir/iter_N) -> Hugging Face folder (adapter or full model)."""
    import torch
    from safetensors.torch import load_file

    from lmtune.config import load_config
    from lmtune.data.templates import get_template
    from lmtune.models.loader import load_model, load_tokenizer
    from lmtune.train.checkpoint import is_sharded_checkpoint, load_sharded_weights, verify_checkpoint

    ck = Path(checkpoint)
    if ck.is_file() and ck.name == "model.safetensors":
        ck = ck.parent
    if not ck.is_dir():
        raise UserError(f"checkpoint '{checkpoint}' does not exist", hint="give a work_dir/iter_N folder")
    problem = verify_checkpoint(ck)
    if problem:
        raise UserError(f"checkpoint '{checkpoint}' is incomplete: {problem}")
    check_not_input(out, checkpoint=ck, config=config)
    check_hf_out(out, overwrite)  # before the slow loading
    from lmtune.models.kinds import model_kind

    cfg = load_config(config if config else str(ck / "config.py"))
    kind = model_kind(cfg)
    if kind.name == "vision_language":
        # Composed (LLM + tower + projector) or an existing VLM, unquantized: a QLoRA checkpoint's
        # adapters go onto the full-precision model (a composed one is then written merged).
        cfg = dataclasses.replace(cfg, quantization="none")
        tokenizer = kind.load_tokenizer(cfg)
        model = kind.load(cfg, torch.device("cpu"), dtype="float32" if fp32 else "auto")
    else:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = load_model(cfg.model, dtype="float32" if fp32 else "auto", trust_remote_code=cfg.trust_remote_code,
                           allow_pickle=cfg.allow_pickle, head=kind.head)
    template = get_template(cfg.prompt_template, tokenizer)
    if cfg.method == "lora":
        model = kind.add_lora(model, cfg)
    params = dict(model.named_parameters())
    if is_sharded_checkpoint(ck):  # written in parts by FSDP2 / DeepSpeed: put them together

        weights = load_sharded_weights(ck, params)
    else:
        weights = load_file(str(ck / "model.safetensors"))
    missing = [k for k in weights if k not in params]
    if missing:
        raise UserError(f"checkpoint weights do not fit the config's model (e.g. '{missing[0]}')",
                        hint="pass the config the checkpoint was trained with, or omit CONFIG")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].dtype))
    if save_format == "internlm2":
        return _save_internlm2(model, cfg, out, max_shard_size, overwrite)
    path = save_trained_model(model, tokenizer, cfg, template, out, max_shard_size=max_shard_size,
                              overwrite=overwrite)
    print(f"[lmtune] wrote {path}")
    return path


def _save_internlm2(model, cfg, out, max_shard_size, overwrite):
    from lmtune.models.internlm2 import save_internlm2
    from lmtune.models.loader import _read_config, resolve_model_path

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    src = _read_config(resolve_model_path(cfg.model) if cfg else "")
    if not src or src.get("model_type") != "internlm2":
        raise UserError("--save-format internlm2 needs an InternLM2-family base model")
    save_internlm2(model, out, config_src=src, max_shard_size=max_shard_size,
                   src_dir=resolve_model_path(cfg.model), overwrite=overwrite)
    return Path(out)


# --------------------------------------------------------------------------- merge


def check_adapter_fits(base_model, adapter_dir: Path) -> None:
    """Compare the adapter's LoRA shapes with the base model's layers; raise a clear error."""
    from safetensors import safe_open

    files = list(adapter_dir.glob("adapter_model.safetensors"))
    if not files:
        if (adapter_dir / "adapter_model.bin").is_file():
            return  # pickle adapters are checked by peft itself
        raise UserError(f"'{adapter_dir}' holds no adapter_model.safetensors")
    modules = dict(base_model.named_modules())
    with safe_open(str(files[0]), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_name = key.split(".lora_")[0]
            for prefix in ("base_model.model.", ""):
                if module_name.startswith(prefix):
                    name = module_name[len(prefix):]
                    if name in modules:
                        break
            else:
                raise UserError(
                    f"the adapter targets layer '{module_name}', which the base model does not have",
                    hint="this adapter was trained on a different base model; pass that one as BASE",
                )
            layer = modules[name]
            shape = f.get_slice(key).get_shape()
            in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
            if ".lora_A." in key and in_f is not None and shape[1] != in_f:
                raise UserError(
                    f"adapter/base mismatch at '{name}': the adapter expects {shape[1]} input features, "
                    f"the base layer has {in_f}",
                    hint="this adapter was trained on a different base model; pass that one as BASE",
                )
            if ".lora_B." in key and out_f is not None and shape[0] != out_f:
                raise UserError(
                    f"adapter/base mismatch at '{name}': the adapter produces {shape[0]} output features, "
                    f"the base layer has {out_f}",
                    hint="this adapter was trained on a different base model; pass that one as BASE",
                )


def merge(base: str, adapter: str, out: str, max_shard_size: str = "2GB", save_format: str = "native",
          trust_remote_code: bool = False, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save a full model folder (the base's dtype)."""
    from peft import PeftModel

    from lmtune.models.loader import load_model, load_tokenizer, resolve_model_path

    adapter_dir = Path(resolve_model_path(adapter))
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"'{adapter}' is not a LoRA adapter folder (no adapter_config.json)")
    check_not_input(out, base=base, adapter=adapter_dir)
    check_hf_out(out, overwrite)  # before the slow loading
    # A reward model's adapter (peft task SEQ_CLS) goes on the base loaded as a sequence classifier.
    task = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    model = load_model(base, dtype="auto", trust_remote_code=trust_remote_code,
                       head="score" if task == "SEQ_CLS" else "lm")
    check_adapter_fits(model, adapter_dir)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = model.merge_and_unload()
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(str(tok_src), trust_remote_code=trust_remote_code)
    meta = adapter_dir / META_FILE
    if save_format == "internlm2":
        from lmtune.models.internlm2 import save_internlm2
        from lmtune.models.loader import _read_config

        src = _read_config(resolve_model_path(base))
        if not src or src.get("model_type") != "internlm2":
            raise UserError("--save-format internlm2 needs an InternLM2-family base model")
        save_internlm2(merged, out, config_src=src, max_shard_size=max_shard_size, src_dir=resolve_model_path(base),
                       overwrite=overwrite)
        return Path(out)
    with atomic_dir(out, marker=HF_MARKER, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, tmp)
        gen_src = adapter_dir / "generation_config.json"
        if gen_src.is_file():
            shutil.copyfile(gen_src, tmp / "generation_config.json")
        for name in PROCESSOR_FILES:  # a vision-language model's processor: the adapter's, else the base's
            src = next((d / name for d in (adapter_dir, Path(resolve_model_path(base))) if (d / name).is_file()), None)
            if src is not None and not (tmp / name).exists():
                shutil.copyfile(src, tmp / name)
        if meta.is_file():
            shutil.copyfile(meta, tmp / META_FILE)
    print(f"[lmtune] merged model written to {out}")
    return Path(out)
