"""InternLM2 / InternLM2.5 checkpoints without remote code.

InternLM2 is Llama maths under other names: RMSNorm pre-norm blocks, grouped-query attention
with rotary embeddings (rotate-half), a SiLU-gated MLP. Two things differ on disk:

- names: `tok_embeddings`, `attention.wqkv`/`attention.wo`, `feed_forward.w1/w3/w2`
  (gate/up/down), `attention_norm`/`ffn_norm`, `output` (the LM head);
- the fused `wqkv` is grouped per KV head: for each KV head g the rows are
  [the q heads of group g (num_heads // num_kv_heads of them), then k_g, then v_g],
  each block head_dim rows. The same grouping applies to the bias when `bias` is true.

So lmtune loads an InternLM2 folder into transformers' own `LlamaForCausalLM` by renaming and
splitting the weights in memory (`from_pretrained(None, config=..., state_dict=...)`: no remote
code, no converted copy on disk, and quantization/device_map go through the normal path).
`save_internlm2` writes the reverse, for tools that want the original layout; the default
export is the native Llama folder, which every transformers app, vLLM and LMDeploy read.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lmtune.atomic import HF_MARKER, atomic_dir
from lmtune.errors import UserError

# auto_map of the published checkpoints; used when the source config has none.
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}

# Files of an InternLM2 folder that travel unchanged with a checkpoint saved in InternLM2 layout
# (remote modelling/tokenizer code and the original tokenizer files).
PASSTHROUGH_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "generation_config.json",
)

# Per-layer module names: native Llama -> InternLM2.
_LAYER_RENAMES = {
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_RENAMES = {
    "model.embed_tokens": "model.tok_embeddings",
    "model.norm": "model.norm",
    "lm_head": "output",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


# --------------------------------------------------------------------------- detection & config


def is_internlm2(config: dict) -> bool:
    """True for a config.json dict of an InternLM2-family checkpoint (InternLM2, InternLM2.5)."""
    if not isinstance(config, dict):
        return False
    if str(config.get("model_type", "")).lower() == "internlm2":
        return True
    return "InternLM2ForCausalLM" in (config.get("architectures") or [])


def _dims(config: dict) -> tuple[int, int, int, int]:
    """(num_heads, num_kv_heads, head_dim, hidden_size) of an InternLM2 config dict."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    if hidden % heads or heads % kv:
        raise UserError(
            f"InternLM2 config has hidden_size={hidden}, num_attention_heads={heads}, "
            f"num_key_value_heads={kv}: the heads must divide evenly"
        )
    return heads, kv, hidden // heads, hidden


def _rope_parameters(config: dict) -> dict:
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = str(scaling.get("type") or scaling.get("rope_type") or "").lower()
    factor = float(scaling.get("factor", 1.0))
    # InternLM2's "dynamic" is dynamic NTK (the base grows once a sequence passes
    # max_position_embeddings); "linear" divides positions by the factor. transformers' rope
    # types of the same names implement the same formulas.
    if kind in ("dynamic", "linear"):
        return {"rope_type": kind, "factor": factor, "rope_theta": theta}
    raise UserError(
        f"InternLM2 config has rope_scaling type '{kind}', which lmtune does not map",
        hint="supported: dynamic, linear, or no rope_scaling",
    )


def internlm2_folder(name_or_path: str) -> str | None:
    """The local folder of an InternLM2 checkpoint named by a path or a hub id; None if it is not one.

    For a hub id only config.json is fetched to decide; an InternLM2 repo is then downloaded
    (weights, configs, tokenizer.model and the remote *.py, which are copied on an InternLM2-layout
    export but never imported).
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        cfg = path / "config.json"
        return str(path) if cfg.is_file() and is_internlm2(_read_json(cfg)) else None
    if path.exists() or str(name_or_path).count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        cfg = _read_json(Path(hf_hub_download(str(name_or_path), "config.json")))
    except Exception:
        return None  # not reachable or not a repo: the generic loader reports it
    if not is_internlm2(cfg):
        return None
    return snapshot_download(
        str(name_or_path),
        allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.py"],
    )


def llama_config_from_internlm2(config: dict):
    """A `transformers.LlamaConfig` with the same maths as an InternLM2 config.json dict."""
    from transformers import LlamaConfig

    heads, kv, head_dim, hidden = _dims(config)
    bias = bool(config.get("bias", False))
    kwargs: dict[str, Any] = dict(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        initializer_range=float(config.get("initializer_range", 0.02)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        use_cache=bool(config.get("use_cache", True)),
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_parameters=_rope_parameters(config),
        # InternLM2's `bias` switches the biases of wqkv and wo; its MLP never has biases.
        attention_bias=bias,
        mlp_bias=False,
        attention_dropout=0.0,
    )
    dtype = config.get("torch_dtype") or config.get("dtype")
    cfg = LlamaConfig(**kwargs)
    if dtype:
        cfg.dtype = dtype
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def internlm2_config_from_llama(llama_config, config_src: dict) -> dict:
    """The InternLM2 config.json dict for a (possibly resized) native model, based on `config_src`."""
    out = copy.deepcopy(dict(config_src))
    get = llama_config.get if isinstance(llama_config, dict) else (lambda k, d=None: getattr(llama_config, k, d))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        value = get(key, None)
        if value is not None:
            out[key] = value
    out["model_type"] = "internlm2"
    out["architectures"] = ["InternLM2ForCausalLM"]
    out.setdefault("auto_map", dict(DEFAULT_AUTO_MAP))
    return out


# --------------------------------------------------------------------------- weights


def split_wqkv(wqkv: torch.Tensor, config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused, per-KV-head grouped wqkv weight (or bias) into q, k, v (Llama order)."""
    heads, kv, head_dim, _ = _dims(config)
    per = heads // kv
    rest = wqkv.shape[1:]
    expected = (heads + 2 * kv) * head_dim
    if wqkv.shape[0] != expected:
        raise UserError(f"wqkv has {wqkv.shape[0]} rows; the config implies {expected}")
    grouped = wqkv.reshape(kv, per + 2, head_dim, *rest)
    q = grouped[:, :per].reshape(heads * head_dim, *rest)
    k = grouped[:, per].reshape(kv * head_dim, *rest)
    v = grouped[:, per + 1].reshape(kv * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict) -> torch.Tensor:
    """Inverse of `split_wqkv`."""
    heads, kv, head_dim, _ = _dims(config)
    per = heads // kv
    rest = q.shape[1:]
    qg = q.reshape(kv, per, head_dim, *rest)
    kg = k.reshape(kv, 1, head_dim, *rest)
    vg = v.reshape(kv, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((heads + 2 * kv) * head_dim, *rest).contiguous()


_LAYER_RX = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def internlm2_to_llama_state_dict(sd: dict, config: dict) -> dict:
    """Rename and split an InternLM2 state dict into `LlamaForCausalLM` names."""
    back_layer = {v: k for k, v in _LAYER_RENAMES.items()}
    back_top = {v: k for k, v in _TOP_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        m = _LAYER_RX.match(name)
        if m:
            layer, module, kind = m.groups()
            prefix = f"model.layers.{layer}."
            if module == "attention.wqkv":
                for sub, part in zip(_QKV, split_wqkv(tensor, config)):
                    out[f"{prefix}{sub}.{kind}"] = part
                continue
            if module in back_layer:
                out[f"{prefix}{back_layer[module]}.{kind}"] = tensor
                continue
            if module.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some exports carry; recomputed from the config
            raise UserError(f"unexpected weight '{name}' in an InternLM2 checkpoint")
        module, _, kind = name.rpartition(".")
        if module in back_top:
            out[f"{back_top[module]}.{kind}"] = tensor
            continue
        raise UserError(f"unexpected weight '{name}' in an InternLM2 checkpoint")
    return out


def llama_to_internlm2_state_dict(sd: dict, config: dict) -> dict:
    """Rename and fuse a `LlamaForCausalLM` state dict into InternLM2 names (wqkv grouped per KV head)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in sd.items():
        if "lora_" in name or ".base_layer." in name:
            raise UserError(
                f"'{name}' belongs to a LoRA adapter; merge the adapter before saving in InternLM2 layout",
                hint="use `lmtune convert merge`, or save the adapter with convert_lora_adapter_to_internlm2",
            )
        m = _LAYER_RX.match(name)
        if m:
            layer, module, kind = m.groups()
            prefix = f"model.layers.{layer}."
            if module in _QKV:
                pending.setdefault((prefix, kind), {})[module] = tensor
                continue
            if module in _LAYER_RENAMES:
                out[f"{prefix}{_LAYER_RENAMES[module]}.{kind}"] = tensor
                continue
            if module.endswith("rotary_emb.inv_freq"):
                continue
            raise UserError(f"weight '{name}' has no place in the InternLM2 layout")
        module, _, kind = name.rpartition(".")
        if module in _TOP_RENAMES:
            out[f"{_TOP_RENAMES[module]}.{kind}"] = tensor
            continue
        if module.endswith("rotary_emb") and kind == "inv_freq":
            continue
        raise UserError(f"weight '{name}' has no place in the InternLM2 layout")
    for (prefix, kind), parts in pending.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise UserError(f"cannot build {prefix}attention.wqkv.{kind}: missing {', '.join(missing)}")
        out[f"{prefix}attention.wqkv.{kind}"] = fuse_wqkv(*(parts[p] for p in _QKV), config)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """All tensors of a Hugging Face folder (safetensors shards; pickle .bin only if allowed)."""
    from safetensors.torch import load_file

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(folder / f)))
        return sd
    bins = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if bins and not allow_pickle:
        raise UserError(
            f"'{folder}' holds only pickle weights ({bins[0]}…), which can run code when loaded",
            where="config key 'model'",
            hint="set allow_pickle = True if you trust this folder, or convert it to safetensors",
        )
    if not bins:
        raise UserError(f"'{folder}' has no weights (*.safetensors or pytorch_model*.bin)")
    sd = {}
    for f in bins:
        sd.update(torch.load(folder / f, map_location="cpu", weights_only=True))
    return sd


def load_internlm2(
    path: str,
    *,
    dtype: Any = "auto",
    device_map: Any = None,
    quantization_config: Any = None,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
):
    """Load an InternLM2 folder as a native `LlamaForCausalLM` (no remote code runs).

    The weights are renamed/split in memory and handed to `from_pretrained` as a state dict, so
    dtype, device_map and quantization (bitsandbytes NF4/int8) work as for any Llama folder.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    folder = Path(path)
    config = _read_json(folder / "config.json")
    if not is_internlm2(config):
        raise UserError(f"'{folder}' is not an InternLM2 checkpoint (model_type={config.get('model_type')!r})")
    llama_cfg = llama_config_from_internlm2(config)
    if dtype == "auto":
        dtype = getattr(torch, str(config.get("torch_dtype") or "float32").replace("torch.", ""), torch.float32)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    sd = internlm2_to_llama_state_dict(read_state_dict(folder, allow_pickle=allow_pickle), config)
    kwargs: dict[str, Any] = {"config": llama_cfg, "state_dict": sd, "dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = LlamaForCausalLM.from_pretrained(None, **kwargs)
    del sd
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except Exception:  # a malformed generation config must not block training
            pass
    # where the model came from (peft records it as the adapter's base_model_name_or_path)
    model.config._name_or_path = str(folder)
    model.name_or_path = str(folder)
    return model


# --------------------------------------------------------------------------- tokenizer


def _spm_proto(model_file: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise UserError(
            "reading InternLM2's tokenizer.model needs the 'sentencepiece' package",
            hint="pip install sentencepiece",
        ) from None
    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def build_internlm2_tokenizer_object(model_file: str | os.PathLike, added_tokens: dict[int, str] | None = None):
    """A `tokenizers.Tokenizer` that encodes like InternLM2Tokenizer does with sentencepiece.

    InternLM2Tokenizer splits the text around added/special tokens and runs sentencepiece on each
    piece, so the dummy prefix "▁" (when the model has add_dummy_prefix) starts every piece, not
    just the first: a Prepend normalizer (normalizers run per piece between added tokens), spaces
    as "▁", no pre-tokenizer, BPE with byte fallback.
    """
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    proto = _spm_proto(Path(model_file))
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise UserError(f"{model_file} is not a BPE sentencepiece model; InternLM2 tokenizers are BPE")
    added_tokens = {int(k): v for k, v in (added_tokens or {}).items()}
    vocab_scores = [(p.piece, p.score) for p in proto.pieces]
    for i, content in added_tokens.items():  # the published vocab marks these ids with placeholders
        if i < len(vocab_scores):
            vocab_scores[i] = (content, vocab_scores[i][1])
    vocab = {piece: i for i, (piece, _score) in enumerate(vocab_scores)}
    # control (3), user-defined (4), unused (5) and byte (6) pieces never take part in merges
    skip = {p.piece for p in proto.pieces if p.type in (2, 3, 4, 5, 6)} | set(added_tokens.values())
    merges = generate_merges(vocab, vocab_scores, skip_tokens=skip)
    unk = proto.trainer_spec.unk_piece or "<unk>"
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    norm = [normalizers.Prepend("▁")] if prefix else []
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    return tok


def load_internlm2_tokenizer(path: str | os.PathLike):
    """InternLM2's tokenizer without its remote class, as a `PreTrainedTokenizerFast`.

    Reads tokenizer.model plus tokenizer_config.json (special tokens, add_bos_token/add_eos_token,
    added_tokens_decoder, chat_template). Saved with `save_pretrained`, it writes a tokenizer.json
    that any transformers version reads (tokenizer_class PreTrainedTokenizerFast).
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(path)
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else {}

    def token_str(value, default):
        if isinstance(value, dict):
            return value.get("content", default)
        return value if value is not None else default

    bos = token_str(tc.get("bos_token"), "<s>")
    eos = token_str(tc.get("eos_token"), "</s>")
    unk = token_str(tc.get("unk_token"), "<unk>")
    pad = token_str(tc.get("pad_token"), eos)
    added_decoder = tc.get("added_tokens_decoder") or {}
    added = {int(k): token_str(v, None) for k, v in added_decoder.items()}
    added = {k: v for k, v in added.items() if v}
    extra = [token_str(t, None) for t in (tc.get("additional_special_tokens") or tc.get("extra_special_tokens") or [])]
    extra = [t for t in extra if t]

    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "tokenizer.model").is_file():
        backend = build_internlm2_tokenizer_object(folder / "tokenizer.model", added)
    else:
        raise UserError(f"'{folder}' has no tokenizer.model or tokenizer.json")

    # Added tokens as in the checkpoint: special ones are matched whole and never split.
    specials = {bos, eos, unk, pad, *extra}
    to_add = []
    for i, content in sorted(added.items()):
        spec = added_decoder.get(str(i), {}) if isinstance(added_decoder.get(str(i)), dict) else {}
        to_add.append(AddedToken(content, special=spec.get("special", True), normalized=False,
                                 lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                 single_word=spec.get("single_word", False)))
    known = {t.content for t in to_add}
    to_add += [AddedToken(t, special=True, normalized=False)
               for t in specials if t not in known and backend.token_to_id(t) is not None]
    backend.add_special_tokens([t for t in to_add if t.special])
    backend.add_tokens([t for t in to_add if not t.special])

    add_bos = bool(tc.get("add_bos_token", True))
    add_eos = bool(tc.get("add_eos_token", False))
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    special_ids = [(t, backend.token_to_id(t)) for t in ([bos] if add_bos else []) + ([eos] if add_eos else [])]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        additional_special_tokens=[t for t in extra],
        clean_up_tokenization_spaces=bool(tc.get("clean_up_tokenization_spaces", False)),
        model_max_length=tc.get("model_max_length", int(1e30)),
        padding_side=tc.get("padding_side", "right"),
    )
    if tc.get("chat_template"):
        tokenizer.chat_template = tc["chat_template"]
    return tokenizer


# --------------------------------------------------------------------------- saving


def save_internlm2(
    model_or_state_dict,
    out_dir: str | os.PathLike,
    config_src: dict,
    max_shard_size: str | int = "2GB",
    *,
    src_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint in InternLM2 layout (config.json + safetensors shards), atomically.

    `model_or_state_dict` is a native `LlamaForCausalLM` (LoRA merged) or its state dict;
    `config_src` the original InternLM2 config.json dict (sizes are refreshed from the model).
    With `src_dir` (the original InternLM2 folder), its remote code (*.py) and tokenizer files are
    copied too, so `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` works.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out_dir)
    if hasattr(model_or_state_dict, "state_dict"):
        model = model_or_state_dict
        if hasattr(model, "peft_config"):
            raise UserError("save_internlm2 got a model with LoRA adapters; merge them first (merge_and_unload)")
        sd = model.state_dict()
        llama_cfg = model.config
    else:
        sd = dict(model_or_state_dict)
        llama_cfg = None
    cfg = dict(config_src)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if "model.embed_tokens.weight" in sd:
        cfg["vocab_size"] = int(sd["model.embed_tokens.weight"].shape[0])
    tied = bool(getattr(llama_cfg, "tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    if tied:
        sd.pop("lm_head.weight", None)
    out_cfg = internlm2_config_from_llama(llama_cfg, cfg) if llama_cfg is not None else internlm2_config_from_llama(cfg, cfg)
    isd = llama_to_internlm2_state_dict(sd, out_cfg)
    dtypes = {t.dtype for t in isd.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        out_cfg["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "")

    with atomic_dir(out, marker=HF_MARKER, overwrite=overwrite) as tmp:
        split = split_torch_state_dict_into_shards(
            isd, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        for filename, names in split.filename_to_tensors.items():
            # safetensors refuses shared or non-contiguous storage; weights here are plain copies
            save_file({n: isd[n].detach().to("cpu").contiguous() for n in names}, str(tmp / filename),
                      metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in isd.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if src_dir is not None:
            src = Path(src_dir)
            for p in list(src.glob("*.py")) + [src / n for n in PASSTHROUGH_FILES]:
                if p.is_file() and not (tmp / p.name).exists():
                    shutil.copy2(p, tmp / p.name)
    return out


# --------------------------------------------------------------------------- LoRA adapters

_ADAPTER_PREFIX = "base_model.model."


def _lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _pattern_value(pattern: dict, module_path: str, default):
    """peft's rank_pattern/alpha_pattern lookup: a key matches the module path or its suffix."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module_path):
            return value
    return default


def _rename_module_path(path: str) -> str:
    """A native module path (e.g. model.layers.3.mlp.up_proj) in InternLM2 names."""
    m = re.match(r"^(.*?model\.layers\.\d+\.)(.+)$", path)
    if m:
        prefix, module = m.groups()
        for native, intern in _LAYER_RENAMES.items():
            if module == native or module.startswith(native + "."):
                return prefix + intern + module[len(native):]
        return path
    for native, intern in _TOP_RENAMES.items():
        for lead in ("", _ADAPTER_PREFIX):
            full = lead + native
            if path == full or path.startswith(full + "."):
                return lead + intern + path[len(full):]
    return path


def convert_lora_state_dict_to_internlm2(adapter_sd: dict, adapter_config: dict, config: dict) -> tuple[dict, dict]:
    """Turn a LoRA adapter trained on the native layout into one for the InternLM2 layout.

    o/gate/up/down/embeddings/lm_head only change names. q_proj, k_proj and v_proj become one
    LoRA on the fused wqkv with rank r_q + r_k + r_v: A stacks the three A's; B places each B's
    rows where that projection's rows sit in wqkv (grouped per KV head) and is zero elsewhere, and
    carries each part's own scaling, so the wqkv adapter (alpha chosen to make its scaling 1)
    adds exactly the three original updates. Returns (state dict, adapter_config dict).
    """
    cfg = copy.deepcopy(adapter_config)
    if cfg.get("use_dora"):
        raise UserError("DoRA adapters cannot be fused into wqkv; merge the adapter and save the full model instead")
    if cfg.get("lora_bias"):
        raise UserError("LoRA adapters with lora_bias cannot be converted; merge the adapter instead")
    alpha0, rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    qkv: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    rx = re.compile(r"^(.*model\.layers\.\d+\.)(self_attn\.[qkv]_proj)\.(lora_[AB])\.weight$")
    for name, tensor in adapter_sd.items():
        m = rx.match(name)
        if m:
            prefix, proj, ab = m.groups()
            qkv.setdefault(prefix, {}).setdefault(proj, {})[ab] = tensor
            continue
        if re.search(r"self_attn\.[qkv]_proj\.", name):
            raise UserError(f"cannot convert adapter weight '{name}' (only lora_A/lora_B on q/k/v can be fused)")
        module, _, rest = name.partition(".lora_") if ".lora_" in name else (name, "", "")
        out[_rename_module_path(module) + (".lora_" + rest if rest else "")] = tensor

    wqkv_ranks = set()
    for prefix, parts in qkv.items():
        missing = [p for p in _QKV if p not in parts or set(parts[p]) != {"lora_A", "lora_B"}]
        if missing:
            raise UserError(
                f"adapter has LoRA on some of q/k/v at {prefix} but not {', '.join(missing)}; "
                "a wqkv adapter needs all three (train with target modules including q_proj, k_proj, v_proj "
                "or 'all-linear'), or merge the adapter instead"
            )
        a_parts, b_parts, ranks = [], [], []
        for proj in _QKV:
            module_path = (prefix + proj).removeprefix(_ADAPTER_PREFIX)
            alpha = float(_pattern_value(alpha_pat, module_path, alpha0))
            a, b = parts[proj]["lora_A"], parts[proj]["lora_B"]
            r = int(a.shape[0])  # the tensors are the truth; the patterns only pick alpha
            a_parts.append(a)
            b_parts.append(b * _lora_scaling(r, alpha, rslora))
            ranks.append(r)
        total = sum(ranks)
        a_cat = torch.cat(a_parts, dim=0)
        padded = []
        offset = 0
        for b, r in zip(b_parts, ranks):
            z = b.new_zeros(b.shape[0], total)
            z[:, offset:offset + r] = b
            padded.append(z)
            offset += r
        b_fused = fuse_wqkv(*padded, config)
        out[f"{prefix}attention.wqkv.lora_A.weight"] = a_cat.contiguous()
        out[f"{prefix}attention.wqkv.lora_B.weight"] = b_fused.to(b_parts[0].dtype)
        wqkv_ranks.add(total)

    targets = cfg.get("target_modules")
    names = {"q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo", "gate_proj": "w1",
             "up_proj": "w3", "down_proj": "w2", "embed_tokens": "tok_embeddings", "lm_head": "output"}
    if isinstance(targets, (list, tuple, set)):
        cfg["target_modules"] = sorted({names.get(t, t) for t in targets})
    elif isinstance(targets, str) and targets != "all-linear":
        for native, intern in names.items():
            targets = targets.replace(native, intern)
        cfg["target_modules"] = targets
    if cfg.get("modules_to_save"):
        cfg["modules_to_save"] = [names.get(t, t) for t in cfg["modules_to_save"]]
    if wqkv_ranks:
        if len(wqkv_ranks) != 1:
            raise UserError("layers of this adapter have different q/k/v ranks; merge the adapter instead")
        r_wqkv = wqkv_ranks.pop()
        rank_pat = {k: v for k, v in rank_pat.items() if not re.search(r"[qkv]_proj", k)}
        alpha_pat = {k: v for k, v in alpha_pat.items() if not re.search(r"[qkv]_proj", k)}
        rank_pat["wqkv"] = r_wqkv
        alpha_pat["wqkv"] = math.sqrt(r_wqkv) if rslora else float(r_wqkv)  # scaling 1: B carries it
    for pat_name, pat in (("rank_pattern", rank_pat), ("alpha_pattern", alpha_pat)):
        renamed = {}
        for key, value in pat.items():
            for native, intern in names.items():
                key = key.replace(native, intern)
            renamed[key] = value
        cfg[pat_name] = renamed
    return out, cfg


def convert_lora_adapter_to_internlm2(src: str | os.PathLike, out_dir: str | os.PathLike, config: dict,
                                      overwrite: bool = False) -> Path:
    """Convert an adapter folder (adapter_config.json + adapter_model.safetensors) for the InternLM2 layout."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out_dir)
    acfg = _read_json(src / "adapter_config.json")
    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"'{src}' has no adapter_model.safetensors")
    sd, new_cfg = convert_lora_state_dict_to_internlm2(load_file(str(weights)), acfg, config)
    with atomic_dir(out, marker=HF_MARKER, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        for p in src.iterdir():
            if p.is_file() and p.name not in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(p, tmp / p.name)
    return out
