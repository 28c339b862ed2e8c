"""`lmtune export gguf MODEL OUT.gguf [--outtype f16|q8_0]`: one GGUF file for llama.cpp / Ollama.

For Llama-family models (Llama, Mistral, SmolLM2, InternLM2 once loaded natively, Qwen2/2.5),
written with the `gguf` package: the hyperparameters, every weight (f16, or q8_0 for the matrices
whose rows split into 32-value blocks), the tokenizer (tokens, types, merges or scores), the chat
template lmtune chats with (the tokenizer's own, or the named template from `lmtune.json`) and
its stop tokens (EOS and end-of-turn), so llama.cpp and Ollama stop where lmtune does.

MODEL is anything `lmtune chat` takes: a HF folder, a training work dir, an adapter folder (it is
merged into its base first), a hub id. The file is written next to OUT and renamed into place,
so OUT is never half-written; an existing OUT is kept unless --overwrite.

Layout notes (facts of the format, checked by loading the file back with transformers):
- GGUF's "llama" architecture applies rotary embeddings to interleaved pairs, transformers'
  Llama to the two halves of each head, so the rows of q_proj and k_proj are reordered per head;
  "qwen2" uses the halves layout and keeps them as they are;
- 1-D tensors (norms, biases) stay float32, as llama.cpp expects.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from lmtune.errors import UserError

OUTTYPES = ("f16", "q8_0")
# transformers model_type -> GGUF architecture, and whether q/k rows are reordered for it
_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


def export_gguf(model: str, out: str, *, outtype: str = "f16", adapter: str | None = None,
                overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF files needs the 'gguf' package", hint="pip install gguf") from None
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'")
    out_path = Path(out).expanduser()
    if out_path.suffix != ".gguf":
        raise UserError(f"the output file should end in .gguf: '{out}'")
    if out_path.is_dir():
        raise UserError(f"'{out}' is a folder; give a file name such as {out_path / 'model.gguf'}")
    if out_path.exists() and not overwrite:
        raise UserError(f"'{out}' already exists", hint="pass --overwrite to replace it, or choose another name")
    if not out_path.parent.is_dir():
        raise UserError(f"the folder '{out_path.parent}' does not exist")

    t0 = time.time()
    lm, tokenizer, meta = _load(model, adapter, trust_remote_code)
    cfg = lm.config
    if cfg.model_type not in _ARCHS:
        raise UserError(f"GGUF export supports Llama-family models ({', '.join(sorted(_ARCHS))}); "
                        f"this one is '{cfg.model_type}'",
                        hint="export a Hugging Face folder (lmtune convert merge) and use llama.cpp's own converter")
    arch_name, permute_qk = _ARCHS[cfg.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)

    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.part")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        _write_hparams(writer, gguf, cfg, outtype, name=_model_title(model, adapter))
        _write_tokenizer(writer, gguf, tokenizer, meta, vocab_rows=lm.get_input_embeddings().weight.shape[0])
        _write_tensors(writer, gguf, lm, arch, outtype, permute_qk)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    size = out_path.stat().st_size / 2**20
    _log(f"wrote {out_path} ({outtype}, {size:.0f} MiB, {time.time() - t0:.0f} s)")
    return out_path


# ---------------------------------------------------------------------------------- loading


def _load(model: str, adapter: str | None, trust_remote_code: bool):
    from lmtune.models.loader import load_model, load_tokenizer, resolve_model_path
    from lmtune.serve.engine import _resolve_adapter, read_lmtune_json

    path = resolve_model_path(model)
    if adapter:
        adapter = _resolve_adapter(adapter)
    lm = load_model(path, dtype="float32", adapter=adapter, trust_remote_code=trust_remote_code)
    if hasattr(lm, "merge_and_unload"):  # an adapter (given, or MODEL is an adapter folder): merge it
        lm = lm.merge_and_unload()
    lm.eval()
    tok_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path
    tokenizer = load_tokenizer(tok_source, trust_remote_code=trust_remote_code)
    meta = read_lmtune_json(path if Path(path).is_dir() else None, adapter)
    return lm, tokenizer, meta


def _model_title(model: str, adapter: str | None) -> str:
    from lmtune.serve.engine import _default_model_name

    return _default_model_name(model, adapter)


# ---------------------------------------------------------------------------------- metadata


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def _write_hparams(w, gguf, cfg, outtype: str, name: str) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", None):
        raise UserError(f"GGUF export does not handle this model's rope scaling ('{rope_type}') yet",
                        hint="use llama.cpp's converter on the exported Hugging Face folder")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
            and cfg.model_type == "mistral":
        raise UserError("GGUF export does not handle sliding-window attention yet")


def _write_tokenizer(w, gguf, tokenizer, meta: dict, vocab_rows: int) -> None:
    """Tokens, their types, merges (BPE) or scores (SentencePiece), special ids, chat template."""
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    from lmtune.data.templates import NamedTemplate, get_template
    from lmtune.models.generation import stop_token_ids

    with tempfile.TemporaryDirectory(prefix="lmtune-gguf-tok-") as d:
        tokenizer.save_pretrained(d)  # one on-disk layout whatever MODEL was (folder, hub id, adapter)
        vocab, model_kind = None, None
        for cls, kind in ((BpeVocab, "gpt2"), (LlamaHfVocab, "llama"), (SentencePieceVocab, "llama")):
            try:
                vocab, model_kind = cls(Path(d)), kind
                break
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue
        if vocab is None:
            raise UserError("this tokenizer is neither byte-level BPE nor SentencePiece: GGUF export cannot "
                            "describe it")
        tokens, scores, types = [], [], []
        for text, score, typ in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(typ)
        # Tokens the tokenizer marks special are control tokens: llama.cpp then reads "<|im_start|>"
        # in a prompt as that one token, not as the characters. (The vocab classes hand out str or
        # bytes depending on the tokenizer kind: compare as str.)
        special = set(tokenizer.all_special_tokens)
        special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        types = [gguf.TokenType.CONTROL if (t.decode("utf-8", "replace") if isinstance(t, bytes) else t) in special
                 else typ for t, typ in zip(tokens, types)]
        if len(tokens) > vocab_rows:
            raise UserError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_rows} embeddings")
        for i in range(len(tokens), vocab_rows):  # embedding rows with no token (padding to a round size)
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model(model_kind)
        if model_kind == "gpt2":
            w.add_tokenizer_pre(_bpe_pre(tokenizer))
        w.add_token_list(tokens)
        w.add_token_types(types)
        if model_kind == "llama":
            w.add_token_scores(scores)
        special_vocab = SpecialVocab(Path(d), load_merges=model_kind == "gpt2", n_vocab=vocab_rows)
        special_vocab.chat_template = None  # written below: the template lmtune chats with
        special_vocab.add_to_gguf(w, quiet=True)

    template = get_template(meta.get("prompt_template") or "auto", tokenizer)
    jinja = template.jinja() if isinstance(template, NamedTemplate) else tokenizer.chat_template
    if jinja:
        w.add_chat_template(jinja)
    # The end-of-turn token: the first stop word that is one token and is not EOS.
    stops = [i for i in stop_token_ids(tokenizer, template.stop_words + list(meta.get("stop_words") or []))
             if i != tokenizer.eos_token_id]
    if stops:
        w.add_eot_token_id(stops[0])


def _bpe_pre(tokenizer) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging."""
    vocab = tokenizer.get_vocab()
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"  # Llama 3
    if "<|im_start|>" in vocab and "<|endoftext|>" in vocab and len(vocab) > 150000:
        return "qwen2"
    if len(vocab) == 49152 and "<|im_start|>" in vocab:
        return "smollm"  # SmolLM / SmolLM2
    return "default"


# ---------------------------------------------------------------------------------- tensors


def _permute_rows(weights, n_head: int):
    """transformers' halves layout -> GGUF llama's interleaved pairs, per head (rows of q/k)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, 2, dim, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def _write_tensors(w, gguf, lm, arch, outtype: str, permute_qk: bool) -> None:
    import numpy as np

    cfg = lm.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for hf_name, tensor in lm.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"GGUF export does not know where the weight '{hf_name}' goes")
        data = tensor.detach().float().cpu().numpy()
        if permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute_rows(data, heads)
        elif permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute_rows(data, kv_heads)
        if data.ndim == 1:
            w.add_tensor(gguf_name, data.astype(np.float32))
        elif outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # shape from the bytes
        else:
            w.add_tensor(gguf_name, data.astype(np.float16))
