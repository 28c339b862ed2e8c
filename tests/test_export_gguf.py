"""`lmtune export gguf`: the file loads back (transformers reads GGUF) with the same logits, the same
tokenizer, chat template and stop tokens; q8_0 keeps greedy answers; refusals leave files alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_tiny_llama  # noqa: E402
from test_serve_common import ENV, ROOT  # noqa: E402

from lmtune.errors import UserError  # noqa: E402
from lmtune.export.gguf import export_gguf  # noqa: E402

TEXTS = ["Hello world, how are you?", "What is 12 plus 30? 1234567", "<|im_start|>user\nHi<|im_end|>\n",
         "中文 测试", "  spaces   and\ttabs\n\nnewlines"]


def load_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def f16_rounded(folder):
    """The source model with every matrix rounded to float16 (1-D tensors stay float32): what an
    f16 file holds, exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    return model


def assert_same_logits(a, b, ids):
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    # Same weights, same float32 maths: equal up to summation-order rounding (a few float32 ulps
    # of the largest logit, times the depth of the sums).
    tol = 64 * torch.finfo(torch.float32).eps * la.abs().max().item()
    assert (la - lb).abs().max().item() <= tol


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.tokens")
            and k not in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory, smol_tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "m", smol_tokenizer, tie_word_embeddings=False,
                           initializer_range=0.2, vocab_size=len(smol_tokenizer) + 20)  # 20 rows without a token


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, smol_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, initializer_range=0.2, eos_token_id=smol_tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-zero biases, so their layout is checked too
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("qwen2") / "m"
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("which", ["tiny_untied", "tiny_qwen2"])
def test_f16_round_trip_same_logits_and_tokenizer(which, request, tmp_path, smol_tokenizer):
    src = request.getfixturevalue(which)
    out = export_gguf(str(src), str(tmp_path / "m.gguf"))
    model, tok = load_back(out)
    ids = torch.tensor([smol_tokenizer("The capital of France is Paris, and Germany's is")["input_ids"]])
    assert_same_logits(f16_rounded(src), model, ids)
    for text in TEXTS:
        assert tok(text)["input_ids"] == smol_tokenizer(text)["input_ids"], text
    assert tok.eos_token_id == smol_tokenizer.eos_token_id
    f = fields(out)
    # llama.cpp parses special tokens in a prompt only when the file marks them as control tokens
    reader = gguf.GGUFReader(out)
    kinds = reader.fields["tokenizer.ggml.token_type"].contents()
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert kinds[smol_tokenizer.convert_tokens_to_ids(name)] == gguf.TokenType.CONTROL, name
    assert kinds[smol_tokenizer.convert_tokens_to_ids("Hello")] == gguf.TokenType.NORMAL
    assert f["general.architecture"] == ("qwen2" if which == "tiny_qwen2" else "llama")
    assert f["tokenizer.chat_template"] == smol_tokenizer.chat_template
    assert f["tokenizer.ggml.eos_token_id"] == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_named_template_and_its_stop_token_go_into_the_file(tiny_untied, tmp_path, smol_tokenizer):
    import shutil

    from lmtune.data.templates import get_template

    src = tmp_path / "src"
    shutil.copytree(tiny_untied, src)
    (src / "lmtune.json").write_text(json.dumps({"prompt_template": "chatml"}))
    f = fields(export_gguf(str(src), str(tmp_path / "m.gguf")))
    assert f["tokenizer.chat_template"] == get_template("chatml", smol_tokenizer).jinja()


def test_q8_0_is_smaller_and_close(tiny_untied, tmp_path):
    f16 = export_gguf(str(tiny_untied), str(tmp_path / "f16.gguf"))
    q8 = export_gguf(str(tiny_untied), str(tmp_path / "q8.gguf"), outtype="q8_0")
    assert q8.stat().st_size < 0.65 * f16.stat().st_size
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q8).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"


def test_refuses_to_replace_a_file_and_leaves_nothing_half_written(tiny_untied, tmp_path):
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"the user's own file")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(str(tiny_untied), str(out))
    assert out.read_bytes() == b"the user's own file"
    export_gguf(str(tiny_untied), str(out), overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.gguf"]  # no .part left behind


def test_refuses_other_architectures(tmp_path, smol_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(smol_tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    with pytest.raises(UserError, match="Llama-family"):
        export_gguf(str(src), str(tmp_path / "x.gguf"))
    assert not any(p.suffix in (".gguf", ".part") for p in tmp_path.iterdir())


def lmtune(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lmtune.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_cli_export_then_chat_with_the_file(tiny_untied, tmp_path):
    out = tmp_path / "tiny.gguf"
    p = lmtune("export", "gguf", str(tiny_untied), str(out))
    assert p.returncode == 0, p.stderr
    env_cache = {"LMTUNE_CACHE_DIR": str(tmp_path / "cache")}
    ENV.update(env_cache)
    try:
        a = lmtune("chat", str(tiny_untied), "--prompt", "hello there", "--max-new-tokens", "8")
        b = lmtune("chat", str(out), "--prompt", "hello there", "--max-new-tokens", "8")
    finally:
        for k in env_cache:
            ENV.pop(k)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    # (the first load of a .gguf converts it; a library may log a line of its own before the answer)
    assert b.stdout.endswith(a.stdout) and a.stdout.strip()


@pytest.mark.slow
def test_q8_0_of_the_embedded_model_keeps_its_greedy_answers(tmp_path, monkeypatch):
    """q8_0 rounds each weight to 1/254 of its block's largest: greedy answers stay the same except
    where two tokens are nearly tied. Checked two ways on the real 135M chat model."""
    from lmtune.serve.engine import Engine

    out = export_gguf("smollm2-135m-instruct", str(tmp_path / "smol-q8.gguf"), outtype="q8_0")
    src = Engine.load("smollm2-135m-instruct")
    # The q8 file's conversion goes to a cache of this test's own, not the machine's (a new
    # temporary path would leave another 0.5 GB model there on every run).
    monkeypatch.setenv("LMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    q8 = Engine.load(str(out))
    prompts = ["What is the capital of France?", "What is 2+2?", "Name a large animal.", "Say hello."]
    answers = [(src.generate([{"role": "user", "content": p}], max_new_tokens=24).text,
                q8.generate([{"role": "user", "content": p}], max_new_tokens=24).text) for p in prompts]
    assert sum(a == b for a, b in answers) >= 3, answers
    # every next-token choice along the source's own answers (teacher forcing)
    agree = total = 0
    for p in prompts:
        ids = src.encode_chat(src.with_system([{"role": "user", "content": p}]))
        gen = src.stream([{"role": "user", "content": p}], max_new_tokens=24)
        gen.result()
        full = torch.tensor([ids + gen.token_ids])
        with torch.no_grad():
            a = src.model(full).logits[0, len(ids) - 1:-1].argmax(-1)
            b = q8.model(full).logits[0, len(ids) - 1:-1].argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    assert agree / total >= 0.9  # 51 of 54 (94%) when measured
