"""The Train form <-> config values. The choices come from the config schema (config.py), so a new
objective, data format or strategy appears in the page once the schema has it."""

from __future__ import annotations

import shutil
import subprocess
import typing
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"
METHODS = {"full": ("full", "none"), "lora": ("lora", "none"), "qlora": ("lora", "nf4")}
SINGLE = "one process"
DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "train" / "deepspeed_configs"

# Form fields that are config keys as they are (the rest: method, datasets, probes, scaling).
PLAIN_KEYS = ("model", "data_format", "objective", "lr", "max_epochs", "max_steps", "max_length", "batch_size",
              "accumulative_counts", "lora_r", "lora_alpha", "pack_to_max_length", "save_steps",
              "evaluation_freq", "val_set_size", "eval_steps")
FORM_KEYS = (*PLAIN_KEYS, "method", "datasets", "system", "evaluation_inputs", "scaling", "nproc")


def _choices(key: str) -> list[str]:
    from lmtune.config import _HINTS

    return list(typing.get_args(_HINTS[key]))


def objectives() -> list[str]:
    return _choices("objective")


def data_formats() -> list[str]:
    return _choices("data_format")


def scaling_choices() -> list[str]:
    """One process, or a distributed strategy; DeepSpeed by its built-in configs (stages)."""
    strategies = [s for s in _choices("strategy") if s not in ("auto", "single", "deepspeed")]
    stages = sorted(f"deepspeed_{p.stem}" for p in DEEPSPEED_DIR.glob("*.json"))
    return [SINGLE, *strategies, *stages]


def model_choices() -> list[str]:
    from lmtune.configs.presets import MODELS

    return [EMBEDDED, *sorted({hub for hub, *_ in MODELS.values()})]


def gpu_count() -> int:
    """NVIDIA GPUs on this machine, without importing torch into the page process."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def defaults(gpus: int = 0) -> dict:
    """The form for a first run on the embedded model: LoRA, short sequences, a few epochs."""
    from lmtune.config import Config

    c = Config()
    return {**{k: getattr(c, k) for k in PLAIN_KEYS}, "max_length": 512, "accumulative_counts": 4,
            "save_steps": 50, "method": "lora", "datasets": "", "system": "",
            "evaluation_inputs": "Who are you?", "scaling": SINGLE, "nproc": max(1, gpus)}


def form_from_config(cfg) -> dict:
    """The form's values for a loaded Config."""
    method = "qlora" if cfg.method == "lora" and cfg.quantization != "none" else cfg.method
    if cfg.strategy == "deepspeed" or cfg.deepspeed:
        scaling = cfg.deepspeed if (cfg.deepspeed or "").startswith("deepspeed_") else f"deepspeed_{cfg.deepspeed or 'zero2'}"
    else:
        scaling = SINGLE if cfg.strategy in ("auto", "single") else cfg.strategy
    return {**{k: getattr(cfg, k) for k in PLAIN_KEYS}, "method": method,
            "datasets": "\n".join(d["path"] for d in cfg.datasets), "system": cfg.system or "",
            "evaluation_inputs": "\n".join(cfg.evaluation_inputs), "scaling": scaling, "nproc": None}


def config_values(form: dict, base_datasets: list | None = None, gpus: int = 0) -> dict:
    """Config values from the form (checked later by lmtune's own config loader). A data path the
    base config already lists keeps its entry there (format, repeat, weight)."""
    values = {k: form[k] for k in PLAIN_KEYS if k in form}
    if isinstance(values.get("model"), str):
        values["model"] = values["model"].strip()
    method = form.get("method") or "lora"
    values["method"], values["quantization"] = METHODS.get(method, (method, "none"))
    if values["method"] != "lora":
        values["lora_layers"] = None  # a base config's LoRA layer choice does not apply to the page's method
    by_path = {}
    for entry in base_datasets or []:
        path = entry if isinstance(entry, str) else entry.get("path") if isinstance(entry, dict) else None
        if path:
            by_path[path] = entry
    paths = [p.strip() for p in (form.get("datasets") or "").splitlines() if p.strip()]
    values["datasets"] = [by_path.get(p, p) for p in paths]
    values["system"] = (form.get("system") or "").strip() or None
    values["evaluation_inputs"] = [q.strip() for q in (form.get("evaluation_inputs") or "").splitlines() if q.strip()]
    if gpus:
        scaling = form.get("scaling") or SINGLE
        if scaling.startswith("deepspeed_"):
            values["strategy"], values["deepspeed"] = "deepspeed", scaling
        else:
            values["strategy"], values["deepspeed"] = ("auto" if scaling == SINGLE else scaling), None
    return values


def processes(form: dict, gpus: int) -> int | None:
    """How many processes `lmtune train` starts (--nproc-per-node), or None for one."""
    if not gpus or (form.get("scaling") or SINGLE) == SINGLE:
        return None
    n = form.get("nproc")
    return int(n) if n else gpus
