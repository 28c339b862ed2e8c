"""The typed training config: schema, loading (.py / .yaml), overrides, list-cfg / copy-cfg.

A config is a Python file of plain top-level assignments (strings, numbers, booleans, lists,
dicts of those) or a YAML file with the same keys. Every key is declared in `Config` below;
an unknown key is an error naming the nearest valid one, and each value is checked for type
and range.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lmtune.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "configs"
PACKAGED_DATA = Path(__file__).parent / "data"

# One data source: a path string, or {"path": ..., "format": ..., "repeat": ..., "weight": ...}.
DataSource = Union[str, dict]


@dataclass
class Config:
    # ---- PART 1: settings -------------------------------------------------------------
    # A local Hugging Face folder, a hub id, a .gguf file, or "smollm2-135m-instruct".
    model: str = "smollm2-135m-instruct"
    # Data sources mixed together; see docs/data.md.
    datasets: list = field(default_factory=list)
    data_format: Literal["auto", "openai", "alpaca", "sharegpt", "oasst1", "pretrain", "kto"] = "auto"
    prompt_template: str = "auto"  # a template name, or "auto" = the tokenizer's own
    system: Optional[str] = None  # system prompt added to conversations that have none
    max_length: int = 2048
    pack_to_max_length: bool = True
    shuffle_before_pack: bool = True
    evaluation_freq: int = 0  # steps between in-training chat probes (0 = only at the end)
    evaluation_inputs: list = field(default_factory=list)
    # Validation: sources like `datasets`, and/or a share (< 1) or count (>= 1) of the training
    # conversations held out; eval loss and perplexity every eval_steps (0 = only at the end).
    val_datasets: list = field(default_factory=list)
    val_set_size: float = 0.0
    eval_steps: int = 0
    save_best: bool = False  # keep the checkpoint with the lowest validation loss (best_checkpoint.json)

    # ---- PART 2: model & method -------------------------------------------------------
    method: Literal["full", "lora"] = "lora"
    objective: Literal["sft", "pretrain", "dpo", "orpo", "simpo", "kto", "reward"] = "sft"
    # Preference optimisation (objectives dpo, orpo, simpo, kto, reward); see docs/preference.md.
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: Optional[float] = None  # None: the objective's default (dpo, kto: 0.1; simpo: 2.0)
    label_smoothing: float = 0.0  # dpo (sigmoid) and simpo: the share of pairs taken as mislabelled
    orpo_lambda: float = 0.1  # weight of ORPO's odds-ratio term beside the chosen answer's NLL
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    simpo_length_normalize: bool = True  # SimPO: mean log-probability per token (False: the sum)
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    # dpo / kto: the reference's log-probabilities computed once before training and cached beside
    # the data cache (no reference forward during training, no second model in memory).
    precompute_reference: bool = False
    # Weight of the KL term on data sources marked loss = "kl_to_base" (see docs/data.md).
    kl_to_base_weight: float = 1.0
    quantization: Literal["none", "nf4", "int8"] = "none"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Union[str, list] = "all-linear"
    # Which transformer layers get LoRA: None (all), a list of layer indices, or a slice "FROM:TO"
    # ("5:" = all but the first five). Layers below the lowest one then need no backward pass.
    lora_layers: Union[str, list, None] = None
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin (pickle) weights; off: safetensors only
    # "auto": on a GPU, checkpoint only as many layers as the memory estimate needs (none when the
    # activations fit: the fastest); on the CPU off. True: every layer; False: none.
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"

    # ---- vision (docs/vision.md): a LLaVA composed from `model` + a vision tower, or a vision-language model
    vision_tower: Optional[str] = None  # a CLIP or SigLIP folder / hub id: compose a LLaVA with `model` as its LLM
    projector: Optional[str] = None  # start from a trained projector: the folder (or work dir) of a pretrain stage
    vision_stage: Literal["finetune", "pretrain"] = "finetune"  # pretrain: only the projector trains
    train_llm: bool = True  # finetune stage: the LLM trains by `method` (LoRA/QLoRA/full); False: frozen
    train_vision_tower: Literal["frozen", "lora", "full"] = "frozen"
    vision_lora_r: int = 0  # LoRA rank on the tower (0: lora_r); XTuner's LLaVA uses 64 there, 512 on the LLM
    vision_lora_alpha: int = 0  # (0: lora_alpha)
    train_projector: Literal["auto", "frozen", "lora", "full"] = "auto"  # auto: full when composed, else frozen
    vision_feature_layer: int = -2  # which tower layer feeds the projector (LLaVA-1.5: the second to last)
    vision_select_strategy: Literal["auto", "default", "full"] = "auto"  # default drops CLIP's CLS feature
    projector_hidden_act: str = "gelu"
    image_folder: Optional[str] = None  # relative image paths start here (default: each data file's folder)

    # ---- PART 3: data processing ------------------------------------------------------
    num_proc: int = 1  # tokenization processes
    max_dataset_samples: int = 0  # 0 = all; otherwise keep the first N after mixing
    pretrain_add_eos: bool = True  # pretraining: end every document with the EOS token

    # ---- PART 4: optimizer & schedule -------------------------------------------------
    lr: float = 2e-4
    # adamw: torch's (fused on GPU); *_8bit / paged_*: bitsandbytes (8-bit state, paged to host memory)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"] = "adamw"
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    max_norm: float = 1.0  # gradient clipping; 0 = off
    warmup_ratio: float = 0.03
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    max_epochs: float = 3
    max_steps: int = 0  # > 0 overrides max_epochs
    batch_size: int = 1  # per device, in rows (a packed row holds several samples)
    accumulative_counts: int = 16
    # Micro-batches of at most this many tokens instead of `batch_size` rows each (a step still takes
    # batch_size x accumulative_counts rows, so the result is the same); "auto": the most the GPU's
    # free memory holds (single GPU and DDP; elsewhere batch_size rows). None: `batch_size` rows.
    batch_tokens: Union[int, Literal["auto"], None] = None

    # ---- PART 5: runtime --------------------------------------------------------------
    seed: int = 42
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    strategy: Literal["auto", "single", "ddp", "fsdp2", "deepspeed"] = "auto"
    deepspeed: Optional[str] = None
    work_dir: Optional[str] = None
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 1
    eval_max_new_tokens: int = 128
    num_workers: int = 0
    # Fast paths (GPU): "auto" picks the best available and the run prints what it chose.
    attn_implementation: str = "auto"
    loss_impl: Literal["auto", "plain", "chunked"] = "auto"
    use_liger_kernel: Literal["auto", "on", "off"] = "auto"
    lora_impl: Literal["auto", "fused", "peft"] = "auto"  # fused: the adapter inside the base matmul's node
    compile: bool = False
    # True: checkpointed layer inputs wait in pinned CPU memory (FSDP2: parameters too); "auto": only
    # when the memory estimate says checkpointing alone does not fit (single GPU).
    cpu_offload: Union[bool, Literal["auto"]] = "auto"

    # Where the config came from (not a user key).
    _source: Optional[str] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


# Names users bring from XTuner-style configs; mapped onto ours so their edits keep working.
ALIASES = {
    "pretrained_model_name_or_path": "model",
    "SYSTEM": "system",
    "data_path": "datasets",
    "alpaca_en_path": "datasets",
    "weight_decay_rate": "weight_decay",
    "max_grad_norm": "max_norm",
    "gradient_accumulation_steps": "accumulative_counts",
    "learning_rate": "lr",
    "num_train_epochs": "max_epochs",
}

RANGES = {
    "max_length": (8, None),
    "lora_r": (1, None),
    "lora_alpha": (1, None),
    "vision_lora_r": (0, None),
    "vision_lora_alpha": (0, None),
    "lora_dropout": (0.0, 1.0),
    "num_proc": (1, 256),
    "lr": (0.0, 1.0),
    "weight_decay": (0.0, None),
    "max_norm": (0.0, None),
    "warmup_ratio": (0.0, 1.0),
    "min_lr_ratio": (0.0, 1.0),
    "max_epochs": (0.0, None),
    "max_steps": (0, None),
    "batch_size": (1, None),
    "accumulative_counts": (1, None),
    "batch_tokens": (1, None),
    "save_steps": (1, None),
    "save_total_limit": (0, None),
    "logging_steps": (1, None),
    "evaluation_freq": (0, None),
    "eval_max_new_tokens": (1, None),
    "max_dataset_samples": (0, None),
    "num_workers": (0, None),
    "label_smoothing": (0.0, 0.49),
    "orpo_lambda": (0.0, None),
    "kl_to_base_weight": (0.0, None),
    "simpo_gamma": (0.0, None),
    "kto_desirable_weight": (0.0, None),
    "kto_undesirable_weight": (0.0, None),
    "val_set_size": (0.0, None),
    "eval_steps": (0, None),
}

FIELD_NAMES = [f.name for f in dataclasses.fields(Config) if not f.name.startswith("_")]
_HINTS = typing.get_type_hints(Config)


def nearest_key(key: str) -> str | None:
    candidates = FIELD_NAMES + list(ALIASES)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:
        lowered = {c.lower(): c for c in candidates}
        match = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.5)
        match = [lowered[m] for m in match]
    return match[0] if match else None


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any, tp, where: str) -> Any:
    """Return the value (coerced where harmless, e.g. int for a float key) or raise UserError."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg, where)
            except UserError:
                pass
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}", where=where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(
                f"config key '{key}' must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}",
                where=where,
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be True or False, got {value!r}", where=where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}' must be an integer, got {value!r}", where=where)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' must be a number, got {value!r}", where=where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}' must be a string, got {value!r}", where=where)
        return value
    if tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}", where=where)
        return value
    return value


def validate(raw: dict, source: str | None = None, lines: dict | None = None) -> Config:
    """Build a Config from a dict of raw values, checking every key and value."""
    lines = lines or {}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{source}:{lines[key]}" if source and key in lines else source
        name = ALIASES.get(key, key)
        if name not in FIELD_NAMES:
            near = nearest_key(key)
            hint = f"did you mean '{near}'?" if near else "see `lmtune list-cfg` and docs/config.md for the keys"
            raise UserError(f"unknown config key '{key}'", where=where, hint=hint)
        if name in ("datasets", "val_datasets") and isinstance(value, (str, dict)):
            value = [value]
        value = _check_type(name, value, _HINTS[name], where)
        if name in RANGES and isinstance(value, (int, float)):
            lo, hi = RANGES[name]
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                span = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                raise UserError(f"config key '{name}' must be {span}, got {value!r}", where=where)
        values[name] = value
    cfg = Config(**values)
    cfg._source = source
    _check_datasets(cfg, source, lines)
    _check_vision(cfg, source, lines)
    if isinstance(cfg.batch_tokens, int) and (cfg.strategy in ("fsdp2", "deepspeed") or cfg.deepspeed):
        where = f"{source}:{lines['batch_tokens']}" if source and "batch_tokens" in lines else source
        raise UserError(f"batch_tokens cannot be used with strategy '{cfg.strategy}'{' (deepspeed)' * bool(cfg.deepspeed)}: "
                        "its processes must all run the same number of micro-batches", where=where,
                        hint="remove batch_tokens (micro-batches of batch_size rows), or use strategy 'ddp'")
    _check_objective(cfg, source, lines)
    if cfg.lora_layers is not None:
        where = f"{source}:{lines['lora_layers']}" if source and "lora_layers" in lines else source
        if cfg.method != "lora":
            raise UserError(f"lora_layers picks the layers that get LoRA; method is '{cfg.method}'", where=where,
                            hint="use method = 'lora', or remove lora_layers")
        try:
            parse_lora_layers(cfg.lora_layers)
        except ValueError as e:
            raise UserError(f"config key 'lora_layers': {e}", where=where,
                            hint='e.g. lora_layers = "4:" (all but the first four) or [0, 1, 2]') from None
    return cfg


def parse_lora_layers(spec) -> tuple[int | None, int | None] | list[int]:
    """`lora_layers` as (start, stop) of a slice, or a list of layer indices; ValueError if neither."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", spec)
        if not m:
            raise ValueError(f"{spec!r} is not a slice 'FROM:TO' of layer indices")
        return tuple(int(g) if g is not None else None for g in m.groups())
    if not spec or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec):
        raise ValueError(f"{spec!r} is not a non-empty list of layer indices (integers >= 0)")
    return sorted(set(spec))


def lora_layer_indices(spec, n_layers: int) -> list[int]:
    """The layer indices `lora_layers` picks in a model of `n_layers` layers; ValueError if it picks
    none or names a layer the model does not have."""
    parsed = parse_lora_layers(spec)
    if isinstance(parsed, tuple):
        picked = list(range(n_layers))[slice(*parsed)]
    else:
        missing = [i for i in parsed if i >= n_layers]
        if missing:
            raise ValueError(f"the model has {n_layers} layers (0-{n_layers - 1}); no layer {missing[0]}")
        picked = parsed
    if not picked:
        raise ValueError(f"{spec!r} picks none of the model's {n_layers} layers")
    return picked


def _check_vision(cfg: Config, source: str | None, lines: dict) -> None:
    def where(key):
        return f"{source}:{lines[key]}" if source and key in lines else source

    if cfg.vision_stage == "pretrain":
        if cfg.train_vision_tower != "frozen":
            raise UserError("vision_stage 'pretrain' trains only the projector; train_vision_tower must be 'frozen'",
                            where=where("train_vision_tower"), hint="train the tower in the finetune stage")
        if cfg.train_projector in ("frozen", "lora"):
            raise UserError("vision_stage 'pretrain' trains the whole projector; train_projector must be 'auto' or "
                            "'full'", where=where("train_projector"))
    if cfg.projector_hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"):
        raise UserError(f"config key 'projector_hidden_act' must be an activation name such as 'gelu', "
                        f"got {cfg.projector_hidden_act!r}", where=where("projector_hidden_act"))




PREFERENCE_FORMATS = ("auto", "openai", "sharegpt", "alpaca", "kto")


def _check_objective(cfg: Config, source: str | None, lines: dict) -> None:
    """Keys that only make sense together (preference objectives, their options, data formats)."""
    def where(key):
        return f"{source}:{lines[key]}" if source and key in lines else source

    preference = cfg.objective in ("dpo", "orpo", "simpo", "kto", "reward")
    if cfg.beta is not None and not cfg.beta > 0:
        raise UserError(f"config key 'beta' must be > 0, got {cfg.beta!r}", where=where("beta"))
    if cfg.label_smoothing and not (cfg.objective in ("dpo", "simpo") and cfg.dpo_loss == "sigmoid"):
        raise UserError("label_smoothing applies to objective 'dpo' with dpo_loss = 'sigmoid', and to 'simpo'",
                        where=where("label_smoothing"), hint="set label_smoothing = 0.0")
    kl = [i for i, d in enumerate(cfg.datasets) if d.get("loss") == "kl_to_base"]
    if kl and cfg.objective not in ("sft", "pretrain"):
        raise UserError(f"datasets[{kl[0]}]: loss 'kl_to_base' applies to objectives 'sft' and 'pretrain', "
                        f"not '{cfg.objective}'", where=where("datasets"), hint="remove the key from that source")
    if kl and len(kl) == len(cfg.datasets):
        raise UserError("every source has loss 'kl_to_base': nothing would teach the model anything new",
                        where=where("datasets"), hint="keep loss 'labels' (the default) on the data to learn from")
    if cfg.objective == "reward" and cfg.evaluation_inputs:
        raise UserError("a reward model does not generate text, so evaluation_inputs cannot be answered",
                        where=where("evaluation_inputs"), hint="set evaluation_inputs = []")
    formats = [cfg.data_format] + [d.get("format", cfg.data_format) for d in cfg.datasets]
    for fmt in formats:
        if preference and fmt not in PREFERENCE_FORMATS:
            raise UserError(f"data format '{fmt}' holds no preference pairs (objective '{cfg.objective}')",
                            where=where("datasets") if fmt != cfg.data_format else where("data_format"),
                            hint=f"use one of {', '.join(PREFERENCE_FORMATS)}; see docs/preference.md")
        if not preference and fmt == "kto":
            raise UserError(f"data format 'kto' is for objective 'kto', not '{cfg.objective}'",
                            where=where("datasets") if fmt != cfg.data_format else where("data_format"))


_SOURCE_KEYS = {"path", "format", "repeat", "weight", "name", "split", "revision", "streaming", "image_folder", "loss"}
# What a source's samples are trained towards: their labels (next-token cross-entropy), or the base
# model's own next-token distribution on them (KL to the base: "keep answering these as before").
SOURCE_LOSSES = ("labels", "kl_to_base")


def _check_datasets(cfg: Config, source: str | None, lines: dict) -> None:
    for name in ("datasets", "val_datasets"):
        where = f"{source}:{lines[name]}" if source and name in lines else source
        normal = []
        for i, entry in enumerate(getattr(cfg, name)):
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict) or "path" not in entry:
                raise UserError(
                    f"config key '{name}[{i}]' must be a path or a dict with a 'path'; got {entry!r}", where=where
                )
            unknown = set(entry) - _SOURCE_KEYS
            if unknown:
                key = sorted(unknown)[0]
                near = difflib.get_close_matches(key, sorted(_SOURCE_KEYS), n=1)
                raise UserError(
                    f"unknown key '{key}' in {name}[{i}]",
                    where=where,
                    hint=f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(sorted(_SOURCE_KEYS))}",
                )
            loss = entry.get("loss", "labels")
            if loss not in SOURCE_LOSSES:
                raise UserError(f"{name}[{i}]: loss must be one of {', '.join(map(repr, SOURCE_LOSSES))}, got {loss!r}",
                                where=where)
            if loss != "labels" and name == "val_datasets":
                raise UserError(f"val_datasets[{i}]: loss {loss!r} applies to training data only", where=where,
                                hint="remove the key; validation loss is next-token cross-entropy")
            entry = dict(entry)
            if cfg.image_folder:
                entry.setdefault("image_folder", cfg.image_folder)
            entry.setdefault("format", cfg.data_format)
            entry.setdefault("repeat", 1)
            normal.append(entry)
        setattr(cfg, name, normal)


# --------------------------------------------------------------------------- loading


def _parse_python_config(path: Path | str, text: str | None = None) -> tuple[dict, dict]:
    """Read top-level assignments of a .py config (or of `text`, named `path`) without importing
    anything. Values must be literals (plus simple arithmetic and references to earlier names),
    so a config can never run code.
    """
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise UserError(f"syntax error in config: {e.msg}", where=f"{path}:{e.lineno}") from None
    env: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            raise UserError(
                "configs are plain values and may not import anything",
                where=f"{path}:{node.lineno}",
                hint="replace class references with their names as strings (see `lmtune copy-cfg`)",
            )
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) != 1 or not isinstance(targets[0], ast.Name):
                raise UserError("only `name = value` assignments are allowed", where=f"{path}:{node.lineno}")
            name = targets[0].id
            try:
                env[name] = _eval_node(node.value, env)
            except _NotPlain as e:
                raise UserError(
                    f"the value of '{name}' is not a plain value ({e})",
                    where=f"{path}:{node.lineno}",
                    hint="use strings, numbers, booleans, None, lists and dicts",
                ) from None
            lines[name] = node.lineno
            continue
        raise UserError(
            "configs may contain only `name = value` assignments", where=f"{path}:{getattr(node, 'lineno', '?')}"
        )
    return env, lines


class _NotPlain(Exception):
    pass


def _eval_node(node: ast.AST, env: dict) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise _NotPlain(f"unknown name '{node.id}'")
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval_node(e, env) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_eval_node(k, env): _eval_node(v, env) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _eval_node(kw.value, env) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)):
        a, b = _eval_node(node.left, env), _eval_node(node.right, env)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.Div: lambda: a / b, ast.FloorDiv: lambda: a // b}
        return ops[type(node.op)]()
    if isinstance(node, ast.JoinedStr):
        raise _NotPlain("f-strings are not allowed")
    raise _NotPlain(type(node).__name__)


def parse_value(text: str) -> Any:
    """Parse a command-line override value: Python/YAML-ish literals, else the string itself."""
    try:
        return _eval_node(ast.parse(text, mode="eval").body, {})
    except (SyntaxError, _NotPlain, ValueError):
        pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    return text


def parse_overrides(items: list[str] | None) -> dict:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value", where="--cfg-options")
        key, _, value = item.partition("=")
        out[key.strip()] = parse_value(value.strip())
    return out


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for suffix in ("", ".py", ".yaml", ".yml"):
        candidate = BUILTIN_DIR / f"{name_or_path}{suffix}"
        if candidate.is_file() and candidate.name not in ("__init__.py", "presets.py"):
            return candidate
    near = difflib.get_close_matches(name_or_path, list_builtin(), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(near)}?" if near else "run `lmtune list-cfg` to see the built-in configs"
    raise UserError(f"config '{name_or_path}' is neither a file nor a built-in config", hint=hint)


def _preset_text(name: str) -> str | None:
    """The text of a built-in preset config (configs/presets.py), unless a file shadows it."""
    from lmtune.configs.presets import render

    if Path(name).is_file():
        return None
    return render(name[:-3] if name.endswith(".py") else name)


def _xtuner_name(name_or_path: str):
    """An XTuner-style built-in name mapped onto ours (see config_names.py), or None."""
    from lmtune.config_names import resolve_xtuner_name

    if Path(name_or_path).suffix or os.sep in name_or_path or name_or_path in list_builtin():
        return None
    return resolve_xtuner_name(name_or_path, list_builtin())


def load_raw(name_or_path: str) -> tuple[dict, dict, str]:
    if not Path(name_or_path).is_file() and _preset_text(name_or_path) is None and not any(
            (BUILTIN_DIR / f"{name_or_path}{s}").is_file() for s in ("", ".py", ".yaml", ".yml")):
        resolved = _xtuner_name(name_or_path)
        if resolved is not None:
            print(f"[lmtune] '{name_or_path}' is an XTuner-style name; using the built-in '{resolved.name}'"
                  + "".join(f"\n         - {n}" for n in resolved.notes), file=sys.stderr)
            raw, lines, source = load_raw(resolved.name)
            return {**raw, **resolved.overrides}, lines, source
    preset = _preset_text(name_or_path)
    if preset is not None:
        source = f"built-in:{name_or_path}"
        raw, lines = _parse_python_config(source, preset)
        return {k: v for k, v in raw.items() if not k.startswith("_")}, lines, source
    path = resolve_config_path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise UserError(f"YAML error in config: {getattr(e, 'problem', e)}", where=where) from None
        if not isinstance(raw, dict):
            raise UserError("a YAML config must be a mapping of keys to values", where=str(path))
        lines = _yaml_key_lines(path)
    else:
        raw, lines = _parse_python_config(path)
        # Lower-case helper names (e.g. `data_root = ...` reused below) are allowed only if they
        # are keys; underscore-prefixed names are private helpers and dropped.
        raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    return raw, lines, str(path)


def _yaml_key_lines(path: Path) -> dict:
    lines = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:", line)
        if m:
            lines[m.group(1)] = i
    return lines


def load_config(name_or_path: str, overrides: dict | None = None) -> Config:
    raw, lines, source = load_raw(name_or_path)
    if overrides:
        for key in overrides:
            name = ALIASES.get(key, key)
            if name not in FIELD_NAMES:
                near = nearest_key(key)
                raise UserError(
                    f"unknown config key '{key}'",
                    where="--cfg-options",
                    hint=f"did you mean '{near}'?" if near else None,
                )
        raw = {**raw, **overrides}
    cfg = validate(raw, source, lines)
    # "lmtune:NAME" names a data file shipped with lmtune (e.g. the general replay data).
    # Relative data paths are relative to the config file, unless they exist from the cwd.
    base = Path(source).parent
    for entry in cfg.datasets + cfg.val_datasets:
        if entry["path"].startswith("lmtune:"):
            entry["path"] = str(PACKAGED_DATA / entry["path"][len("lmtune:"):])
            continue
        p = Path(os.path.expanduser(entry["path"]))
        if not p.is_absolute() and not p.exists() and (base / p).exists():
            entry["path"] = str(base / p)
    return cfg


def check_paths(cfg: Config, data: bool = True, models: bool = True) -> None:
    """Fail early, naming the key, if a data file or local model path does not exist (`data` /
    `models` False: the caller brings its own rows / model)."""
    from lmtune.data.hub import is_datasets_source

    where = cfg._source or "config"
    for name in ("datasets", "val_datasets") if data else ():
        for i, entry in enumerate(getattr(cfg, name)):
            if not Path(os.path.expanduser(entry["path"])).exists() and not is_datasets_source(entry):
                raise UserError(
                    f"{name}[{i}] path '{entry['path']}' does not exist",
                    where=where,
                    hint=f"fix the '{name}' key, or make the data with `lmtune data self-cognition`",
                )
    if data and not cfg.datasets:
        raise UserError("no training data: the 'datasets' key is empty", where=where,
                        hint="set datasets = ['path/to/data.jsonl'] in the config or with --cfg-options")
    if not models:
        return
    model = os.path.expanduser(cfg.model)
    # A hub id is "org/name"; anything else with a path shape must exist locally.
    looks_local = (model.startswith((".", "/", "~")) or model.endswith(".gguf")
                   or os.sep in model.strip("/").split("/", 1)[-1])
    if looks_local and not Path(model).exists():
        raise UserError(
            f"model path '{cfg.model}' does not exist", where=f"{where} (key 'model')",
            hint="point 'model' at a Hugging Face folder, a .gguf file, a hub id or 'smollm2-135m-instruct'",
        )
    for key in ("vision_tower", "projector"):
        value = getattr(cfg, key)
        if value and value.startswith((".", "/", "~")) and not Path(os.path.expanduser(value)).exists():
            raise UserError(f"{key} path '{value}' does not exist", where=f"{where} (key '{key}')",
                            hint="run the pretrain stage first" if key == "projector" else
                            "point vision_tower at a CLIP or SigLIP folder or hub id")


# --------------------------------------------------------------------------- list / copy


def list_builtin(pattern: str | None = None) -> list[str]:
    from lmtune.configs.presets import preset_names

    names = sorted({p.stem for p in BUILTIN_DIR.glob("*.py") if p.name not in ("__init__.py", "presets.py")}
                   | set(preset_names())) + sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    if pattern:
        rx = re.compile(pattern.replace("*", ".*"), re.IGNORECASE)
        names = [n for n in names if rx.search(n)]
    return names


def copy_builtin(name: str, dest_dir: str, overwrite: bool = False) -> Path:
    """Copy a built-in config to DEST_DIR/NAME_copy.py; an edited copy there is kept unless `overwrite`.
    An XTuner-style name copies our nearest built-in under the user's name, with the differences noted."""
    from lmtune.atomic import atomic_file

    resolved = None if Path(name).is_file() else _xtuner_name(name)
    builtin = resolved.name if resolved else name
    text = _preset_text(builtin)
    if text is not None:
        stem, suffix = builtin[:-3] if builtin.endswith(".py") else builtin, ".py"
    else:
        src = resolve_config_path(builtin)
        stem, suffix, text = src.stem, src.suffix, src.read_text(encoding="utf-8")
    target = Path(dest_dir) / f"{name if resolved else stem}_copy{suffix}"
    if resolved:  # keep the user's name; say what differs; carry the epochs over
        header = "".join(f"# - {n}\n" for n in resolved.notes)
        text = f"# From lmtune's built-in '{resolved.name}' for the XTuner-style name '{name}':\n{header}\n" + text
        for key, value in resolved.overrides.items():
            text, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", text, flags=re.M)
            if not n:
                text += f"{key} = {value!r}\n"
    with atomic_file(target, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return target


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as a .py file of plain assignments (kept with checkpoints)."""
    lines = ["# Resolved lmtune config (written by lmtune; loadable with `lmtune train`)."]
    for key, value in cfg.to_dict().items():
        lines.append(f"{key} = {value!r}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
