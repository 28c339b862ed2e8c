"""InternLM2 checkpoints without remote code (issue #8).

The reference below is a plain PyTorch forward pass of the InternLM2 architecture written from its
definition (module names as in the published checkpoints, fused wqkv grouped per KV head, rotary
embeddings with the checkpoint's dynamic-NTK / linear scaling). lmtune's loaded LlamaForCausalLM must
give the same logits, and round trips through the InternLM2 layout must be exact.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmtune.errors import UserError
from lmtune.models import internlm2 as il

FIXTURES = Path(__file__).parent / "fixtures" / "internlm2"


# --------------------------------------------------------------------------- reference InternLM2


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def ref_rope_cos_sin(cfg, seq_len, head_dim):
    """InternLM2 rotary tables: plain, linear (positions / factor) or dynamic NTK (base grows past max_pos)."""
    base = float(cfg.get("rope_theta", 10000))
    scaling = cfg.get("rope_scaling") or {}
    kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
    max_pos = cfg["max_position_embeddings"]
    if kind == "dynamic" and seq_len > max_pos:
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float64)
    if kind == "linear":
        t = t / factor
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RefAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h = cfg["num_attention_heads"]
        self.kv = cfg["num_key_value_heads"]
        self.d = cfg["hidden_size"] // self.h
        self.wqkv = nn.Linear(cfg["hidden_size"], (self.h + 2 * self.kv) * self.d, bias=cfg["bias"])
        self.wo = nn.Linear(self.h * self.d, cfg["hidden_size"], bias=cfg["bias"])

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        per = self.h // self.kv
        # wqkv rows, per KV head g: [q heads of group g ..., k_g, v_g], each head_dim rows
        qkv = self.wqkv(x).view(b, s, self.kv, per + 2, self.d)
        q = qkv[:, :, :, :per].reshape(b, s, self.h, self.d).transpose(1, 2)
        k = qkv[:, :, :, per].transpose(1, 2)
        v = qkv[:, :, :, per + 1].transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # query head i attends with KV head i // per
        k = k.repeat_interleave(per, dim=1)
        v = v.repeat_interleave(per, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        out = scores.softmax(-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, s, self.h * self.d))


class RefMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=False)
        self.w3 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=False)
        self.w2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RefRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.attention = RefAttention(cfg)
        self.ffn_norm = RefRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.feed_forward = RefMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class RefBody(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(RefLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RefRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class RefInternLM2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = RefBody(cfg)
        self.output = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, input_ids):
        cos, sin = ref_rope_cos_sin(self.cfg, input_ids.shape[1], self.cfg["hidden_size"] // self.cfg["num_attention_heads"])
        x = self.model.tok_embeddings(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.output(self.model.norm(x))


def tiny_config(**over):
    cfg = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": dict(il.DEFAULT_AUTO_MAP),
        "model_type": "internlm2",
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
        "attn_implementation": "eager",
        "pretraining_tp": 1,
    }
    cfg.update(over)
    return cfg


def make_checkpoint(folder: Path, cfg: dict, seed: int = 0, shards: int = 1) -> RefInternLM2:
    """A tiny random checkpoint in InternLM2 layout (config.json + safetensors), and its reference model."""
    torch.manual_seed(seed)
    ref = RefInternLM2(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norms catch a swapped norm
            else:
                p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    names = sorted(sd)
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[i::shards]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "modeling_internlm2.py").write_text("# stands for the remote code; never imported\n")
    return ref.eval()


# --------------------------------------------------------------------------- detection & config


def test_detection():
    real = json.loads((FIXTURES / "internlm2_chat_1_8b_config.json").read_text())
    assert il.is_internlm2(real)
    assert il.is_internlm2({"architectures": ["InternLM2ForCausalLM"]})
    assert not il.is_internlm2({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert not il.is_internlm2({"model_type": "internlm3"})


def test_llama_config_of_published_1_8b():
    real = json.loads((FIXTURES / "internlm2_chat_1_8b_config.json").read_text())
    c = il.llama_config_from_internlm2(real)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2048, 16, 8, 128)
    assert (c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (24, 8192, 92544)
    assert c.rope_parameters["rope_type"] == "dynamic"
    assert c.rope_parameters["factor"] == 2.0 and c.rope_parameters["rope_theta"] == 1e6
    assert c.max_position_embeddings == 32768 and c.rms_norm_eps == 1e-5
    assert c.attention_bias is False and c.mlp_bias is False and c.tie_word_embeddings is False


def test_unknown_rope_scaling_is_a_user_error():
    with pytest.raises(UserError, match="rope_scaling type 'yarn'"):
        il.llama_config_from_internlm2(tiny_config(rope_scaling={"type": "yarn", "factor": 4.0}))


def test_split_and_fuse_wqkv_follow_kv_groups():
    cfg = tiny_config(hidden_size=8, num_attention_heads=4, num_key_value_heads=2)  # head_dim 2, 2 q per kv
    # label each wqkv row block: group g -> q(2g), q(2g+1), k(g), v(g)
    labels = []
    for g in range(2):
        labels += [f"q{2 * g}", f"q{2 * g + 1}", f"k{g}", f"v{g}"]
    codes = {lab: i for i, lab in enumerate(sorted(set(labels)))}
    w = torch.tensor([codes[lab] for lab in labels for _ in range(2)], dtype=torch.float32)[:, None].repeat(1, 8)
    q, k, v = il.split_wqkv(w, cfg)
    assert [int(x) for x in q[::2, 0]] == [codes[f"q{i}"] for i in range(4)]
    assert [int(x) for x in k[::2, 0]] == [codes["k0"], codes["k1"]]
    assert [int(x) for x in v[::2, 0]] == [codes["v0"], codes["v1"]]
    assert torch.equal(il.fuse_wqkv(q, k, v, cfg), w)


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize(
    "over,seq_len",
    [
        ({}, 12),  # dynamic NTK within max_position_embeddings: plain RoPE
        ({}, 24),  # dynamic NTK past max_position_embeddings: the base grows
        ({"rope_scaling": {"type": "linear", "factor": 2.0}, "bias": True}, 20),
        ({"rope_scaling": None, "num_key_value_heads": 8, "rope_theta": 1e6}, 10),  # MHA
        ({"num_key_value_heads": 1}, 10),  # MQA
    ],
)
def test_logits_match_reference(tmp_path, over, seq_len):
    cfg = tiny_config(**over)
    ref = make_checkpoint(tmp_path / "ckpt", cfg, shards=2)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (2, seq_len))
    with torch.no_grad():
        expected = ref(ids)
        got = model(input_ids=ids).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_pickle_weights_need_allow_pickle(tmp_path):
    cfg = tiny_config()
    ref = make_checkpoint(tmp_path / "ckpt", cfg)
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32, allow_pickle=True)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- round trips


def test_round_trip_internlm2_layout(tmp_path):
    cfg = tiny_config(bias=True)
    make_checkpoint(tmp_path / "ckpt", cfg)
    original = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32)
    out = il.save_internlm2(model, tmp_path / "out", cfg, max_shard_size=20_000, src_dir=tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    saved = {}
    for f in sorted(set(index["weight_map"].values())):
        saved.update(load_file(str(out / f)))
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), name
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["model_type"] == "internlm2"
    assert saved_cfg["architectures"] == ["InternLM2ForCausalLM"]
    assert saved_cfg["auto_map"] == cfg["auto_map"]
    for key in ("hidden_size", "num_key_value_heads", "rope_scaling", "rope_theta", "bias", "vocab_size"):
        assert saved_cfg[key] == cfg[key], key
    assert (out / "modeling_internlm2.py").is_file()  # remote code travels with the layout
    # and it loads back to the same model
    again = il.load_internlm2(str(out), dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_native_save_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    ref = make_checkpoint(tmp_path / "ckpt", cfg)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "native")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32)
    ids = torch.arange(20)[None] % cfg["vocab_size"]
    with torch.no_grad():
        assert torch.allclose(native(input_ids=ids).logits, ref(ids), atol=1e-5, rtol=0)


def test_save_is_atomic_and_refuses_unmerged_lora(tmp_path):
    cfg = tiny_config()
    make_checkpoint(tmp_path / "ckpt", cfg)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32)
    out = il.save_internlm2(model, tmp_path / "out", cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sd = dict(model.state_dict())
    sd["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    with pytest.raises(UserError, match="merge the adapter"):
        il.save_internlm2(sd, out, cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no leftovers


# --------------------------------------------------------------------------- LoRA adapters


@pytest.mark.parametrize("rslora", [False, True])
def test_native_lora_adapter_converts_to_wqkv_layout(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    cfg = tiny_config(bias=True)
    ref = make_checkpoint(tmp_path / "ckpt", cfg)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32)
    lcfg = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_model = get_peft_model(model, lcfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)  # lora_B starts at zero: make the update visible
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, cfg["vocab_size"], (1, 14))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits

    out = il.convert_lora_adapter_to_internlm2(tmp_path / "adapter", tmp_path / "adapter_il", cfg)
    new_cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(new_cfg["target_modules"]) == ["w1", "w2", "w3", "wo", "wqkv"]
    assert new_cfg["rank_pattern"]["wqkv"] == 4 + 2 + 4

    # apply the converted adapter with peft to the reference InternLM2 model (InternLM2 names)
    lora_il = LoraConfig.from_pretrained(str(out))
    inject_adapter_in_model(lora_il, ref)
    weights = load_file(str(out / "adapter_model.safetensors"))
    renamed = {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k.removeprefix("base_model.model.")): v
               for k, v in weights.items()}
    missing, unexpected = ref.load_state_dict(renamed, strict=False)
    assert unexpected == []
    assert not [m for m in missing if "lora_" in m]
    with torch.no_grad():
        got = ref(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()

    # and the merged model saved in InternLM2 layout gives the same logits in the reference
    merged = peft_model.merge_and_unload()
    saved = il.save_internlm2(merged, tmp_path / "merged_il", cfg)
    plain = RefInternLM2(cfg).eval()
    plain.load_state_dict(load_file(str(saved / "model.safetensors")))
    with torch.no_grad():
        assert torch.allclose(plain(ids), expected, atol=1e-5, rtol=0)


def test_adapter_on_part_of_qkv_is_refused(tmp_path):
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(UserError, match="needs all three"):
        il.convert_lora_state_dict_to_internlm2(sd, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, tiny_config())


# --------------------------------------------------------------------------- tokenizer

SPECIALS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "你好，世界！我是书生·浦语，一个人工智能助手。",
    "The quick brown fox jumps over the lazy dog 1234567890.",
    "user assistant system\n  two spaces\tand a tab",
] * 40


def make_tokenizer_folder(folder: Path, add_dummy_prefix: bool):
    """A tiny sentencepiece BPE model laid out like InternLM2's (byte fallback, special tokens in the vocab)."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        user_defined_symbols=SPECIALS, add_dummy_prefix=add_dummy_prefix, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tc = json.loads((FIXTURES / "tokenizer_config.json").read_text())
    ids = {s: sp.piece_to_id(s) for s in SPECIALS}
    decoder = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < 3}
    for s, i in ids.items():
        decoder[str(i)] = dict(tc["added_tokens_decoder"]["92543"], content=s)
    tc["added_tokens_decoder"] = decoder
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return sp, ids, tc


def reference_encode(sp, ids, text):
    """InternLM2Tokenizer's definition: BOS, then sentencepiece on each piece between special tokens."""
    out = [sp.bos_id()]
    for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if part:
            out += [ids[part]] if part in ids else sp.encode(part)
    return out


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
def test_tokenizer_matches_sentencepiece(tmp_path, add_dummy_prefix):
    sp, ids, tc = make_tokenizer_folder(tmp_path / "tok", add_dummy_prefix)
    tok = il.load_internlm2_tokenizer(tmp_path / "tok")
    texts = [
        "Hello world",
        "<|im_start|>user\nHello world 你好<|im_end|>\n<|im_start|>assistant\n  spaces  here<|im_end|>\n",
        "lazy dog 42\tTab",
        "数字123和emoji🙂",  # byte fallback
    ]
    for text in texts:
        assert tok.encode(text) == reference_encode(sp, ids, text), text
        if not add_dummy_prefix:
            assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<s>" + text
        if not any(s in text for s in SPECIALS):
            assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<|im_end|>") == ids["<|im_end|>"]
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "</s>"
    assert tok.chat_template == tc["chat_template"]
    # saved, it reloads with plain transformers to the same ids (no remote code, no sentencepiece)
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in texts:
        assert again.encode(text) == tok.encode(text)


# --------------------------------------------------------------------------- chat template

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [
        {"role": "system", "content": "You are an AI assistant whose name is InternLM (书生·浦语)."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am InternLM.\nHow can I help?"},
    ],
    [
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2+2?  "},
        {"role": "assistant", "content": ""},
    ],
]


def checkpoint_render(messages, add_generation_prompt):
    import jinja2

    tpl = json.loads((FIXTURES / "tokenizer_config.json").read_text())["chat_template"]
    return jinja2.Environment().from_string(tpl).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_internlm2_chat_template_matches_checkpoint(conv, add_generation_prompt):
    from lmtune.data.templates import get_template

    tpl = get_template("internlm2_chat")
    messages = CONVERSATIONS[conv]
    assert tpl.render(messages, add_generation_prompt=add_generation_prompt) == checkpoint_render(
        messages, add_generation_prompt
    )
    assert "<|im_end|>" in tpl.stop_words


def test_checkpoint_template_fixture_is_the_published_string():
    tpl = json.loads((FIXTURES / "tokenizer_config.json").read_text())["chat_template"]
    # tokenizer_config.json holds JSON "\n", i.e. a real newline inside each Jinja string literal
    assert tpl == (
        "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert checkpoint_render(CONVERSATIONS[0], True) == "<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------- QLoRA, loader helper, configs


def test_nf4_load_equals_the_native_folder_path(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    make_checkpoint(tmp_path / "ckpt", cfg)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32).save_pretrained(tmp_path / "native")
    via_folder = LlamaForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32, quantization_config=q)
    ids = torch.arange(12)[None]
    # train first: on CPU a no-grad forward moves 4-bit weights to an inference layout, after
    # which LoRA gradients vanish (a bitsandbytes CPU trait, see GUIDE.md)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32, quantization_config=q)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32, quantization_config=q)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, via_folder(input_ids=ids).logits)


def test_internlm2_folder_detects_local_checkpoints(tmp_path):
    make_checkpoint(tmp_path / "ckpt", tiny_config())
    assert il.internlm2_folder(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert il.internlm2_folder(str(tmp_path / "llama")) is None
    assert il.internlm2_folder(str(tmp_path / "missing" / "x" / "y")) is None


@pytest.mark.parametrize("model", ["internlm2_chat_1_8b", "internlm2_chat_7b", "internlm2_5_chat_7b"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_builtin_configs_load(model, method):
    from lmtune.config import load_config

    cfg = load_config(f"{model}_{method}_custom")
    # The checkpoint's own template, which internlm2_chat equals (tests/test_data_templates.py).
    assert cfg.prompt_template == "auto"
    assert cfg.model.startswith("internlm/")
    assert cfg.method == ("full" if method == "full" else "lora")
    assert cfg.quantization == ("nf4" if method == "qlora" else "none")
    assert cfg.datasets[0]["format"] == "openai"


def test_lmtune_loader_loads_internlm2_natively(tmp_path):
    """Through lmtune's own loader: no remote code, native model, faithful tokenizer, base recorded."""
    from peft import LoraConfig, get_peft_model

    from lmtune.models.loader import load_model, load_tokenizer

    sp, ids, _ = make_tokenizer_folder(tmp_path / "ckpt", add_dummy_prefix=False)
    cfg = tiny_config(vocab_size=sp.get_piece_size())
    ref = make_checkpoint(tmp_path / "ckpt", cfg)
    model = load_model(str(tmp_path / "ckpt"), dtype="float32")
    tok = load_tokenizer(str(tmp_path / "ckpt"))
    assert type(model).__name__ == "LlamaForCausalLM"
    x = torch.tensor([tok.encode("<|im_start|>user\nHello world<|im_end|>\n")])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, ref(x), atol=1e-5, rtol=0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "ckpt")
