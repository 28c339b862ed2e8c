"""Chat templates: our rendering equals the tokenizer's own apply_chat_template.

The references are the published `chat_template` strings of each model family, stored byte for byte in
tests/fixtures/chat_templates/ (sources in its README), rendered by transformers'
`apply_chat_template` exactly as a real checkpoint's tokenizer would render them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from lmtune.data.conversation import Message
from lmtune.data.templates import NAMED, TEMPLATE_NAMES, get_template
from lmtune.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
PUBLISHED_DIR = FIXTURES / "chat_templates"

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|system|>",
           "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<｜begin▁of▁sentence｜>",
           "<｜end▁of▁sentence｜>"]


@dataclass(frozen=True)
class Published:
    file: str  # in tests/fixtures/chat_templates/ (or a tokenizer_config.json elsewhere in fixtures/)
    bos: Optional[str]
    eos: str
    sha256: str  # the fixture is a byte-exact copy: changing it must be deliberate

    def text(self) -> str:
        path = FIXTURES / self.file if "/" in self.file else PUBLISHED_DIR / self.file
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))["chat_template"]
        return path.read_text(encoding="utf-8")


PUBLISHED = {
    "Qwen2.5-Instruct": Published("qwen2_5_instruct.jinja", None, "<|im_end|>",
                                  "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"),
    "Llama-3-Instruct": Published("llama3_instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                                  "ba03a121d097859c7b5b9cd03af99aafe95275210d2876f642ad9929a150f122"),
    "Llama-3.1-Instruct": Published("llama3_1_instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                                    "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"),
    "Llama-3.2-Instruct": Published("llama3_2_instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                                    "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4"),
    "Mixtral-Instruct": Published("mixtral_instruct.jinja", "<s>", "</s>",
                                  "26a59556925c987317ce5291811ba3b7f32ec4c647c400c6cc7e3a9993007ba7"),
    "Gemma-2-it": Published("gemma2_it.jinja", "<bos>", "<eos>",
                            "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6"),
    "Phi-3-mini-instruct": Published("phi3_mini_instruct.jinja", "<s>", "<|endoftext|>",
                                     "dcaee66df77bfbb789ec541fe713218da30225a526f1db97138fc39ee6dc56aa"),
    "Llama-2-chat": Published("llama2_chat.jinja", "<s>", "</s>",
                              "e8d5b5a546d3f19df16a5320c614fab05bdc4edd50e850f1afd947b503ea41cf"),
    "DeepSeek-LLM-chat": Published("deepseek_llm_chat.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                   "5b0c475e85b3954175a606f8e7540ec0c6a16edb516e2b8cd0c000dff7b1ad65"),
    "InternLM2-chat": Published("internlm2/tokenizer_config.json", "<s>", "</s>",
                                "3ad60a8ee8a0a63a1f1d51884787d557eb6a312e5689148b4d599639ac42801b"),
}

# Our named template -> the published template it renders exactly (for every conversation the
# published one accepts; Qwen2.5 only where the conversation has a system message, see below).
EQUALS = {
    "llama3_chat": "Llama-3-Instruct",
    "mistral": "Mixtral-Instruct",
    "gemma": "Gemma-2-it",
    "phi3_chat": "Phi-3-mini-instruct",
    "llama2_chat": "Llama-2-chat",
    "deepseek": "DeepSeek-LLM-chat",
    "internlm2_chat": "InternLM2-chat",
}

CONVS = [
    [Message("user", "Hi"), Message("assistant", "Hello! 你好")],
    [Message("system", "You are Bob."), Message("user", "Who are you?"), Message("assistant", "I am Bob."),
     Message("user", "Sure?"), Message("assistant", "Yes.")],
    [Message("user", "One"), Message("assistant", "Two"), Message("user", "Three"), Message("assistant", "Four")],
    # Text with surrounding whitespace and inner newlines: the templates that trim must agree.
    [Message("system", " Answer briefly.\n"), Message("user", "  line1\nline2 "),
     Message("assistant", " first\n\nsecond  "), Message("user", "\n你好\n"), Message("assistant", "再见")],
]
NO_SYSTEM = [c for c in CONVS if c[0].role != "system"]


@pytest.fixture(scope="module")
def backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL + ["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello who are you I am Bob user assistant system model"] * 20, trainer)
    return tok


def wrap(backend, bos, eos, template):
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos)
    t.chat_template = template
    return t


def published(backend, name):
    ref = PUBLISHED[name]
    return wrap(backend, ref.bos, ref.eos, ref.text())


def apply(tok, msgs, gen=False, **kwargs):
    return tok.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs], tokenize=False,
                                   add_generation_prompt=gen, **kwargs)


def trained(template, conv):
    return [(s.kind, s.text) for s in template.segments(conv) if s.trains]


def prompt_of(conv):
    """The conversation up to its last user message: what a model is asked to continue."""
    return conv[:-1] if conv[-1].role == "assistant" else conv


# --------------------------------------------------------------------------- the published templates


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_fixture_is_the_stored_published_string(name):
    ref = PUBLISHED[name]
    path = FIXTURES / ref.file if "/" in ref.file else PUBLISHED_DIR / ref.file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256, f"{path} changed"
    assert ref.file in (PUBLISHED_DIR / "README.md").read_text() or "internlm2" in ref.file


@pytest.mark.parametrize("ours_name", sorted(EQUALS))
def test_named_template_equals_published(backend, ours_name):
    tok = published(backend, EQUALS[ours_name])
    ours, auto = get_template(ours_name, tok), get_template("auto", tok)
    from jinja2 import TemplateError

    rendered = 0
    for conv in CONVS:
        try:
            ref = apply(tok, conv)
        except TemplateError:
            # Only a system message may be refused (Gemma, Mixtral); ours puts it before the first
            # user message instead, and "auto" says so clearly.
            assert conv[0].role == "system", ours_name
            assert ours.render(conv).count(conv[0].content.strip()) == 1
            with pytest.raises(UserError, match="refuses this conversation"):
                auto.segments(conv)
            continue
        rendered += 1
        assert ours.render(conv) == ref, ours_name
        assert ours.render(prompt_of(conv), add_generation_prompt=True) == apply(tok, prompt_of(conv), True)
        # The same reply and end-of-turn spans carry loss as with the tokenizer's own template.
        assert trained(ours, conv) == trained(auto, conv), ours_name
    assert rendered >= len(NO_SYSTEM)


def test_chatml_equals_qwen2_5_except_its_default_system_prompt(backend):
    tok = published(backend, "Qwen2.5-Instruct")
    chatml, auto = get_template("chatml", tok), get_template("auto", tok)
    default = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    for conv in CONVS:
        for msgs, gen in ((conv, False), (prompt_of(conv), True)):
            ref = apply(tok, msgs, gen)
            assert auto.render(msgs, gen) == ref
            if msgs[0].role == "system":
                assert chatml.render(msgs, gen) == ref
            else:  # the one deliberate difference: "auto" (the built-in Qwen configs) keeps it
                assert ref == default + chatml.render(msgs, gen)
        assert trained(chatml, conv) == trained(auto, conv)
    assert auto.stop_words == chatml.stop_words == ["<|im_end|>"]


LLAMA31_HEADER = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                  "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>")


@pytest.mark.parametrize("name", ["Llama-3.1-Instruct", "Llama-3.2-Instruct"])
def test_llama3_chat_vs_llama3_1_and_3_2_differ_only_by_the_dated_system_block(backend, name):
    """Llama 3.1/3.2 open every conversation with a system block that carries a knowledge-cutoff
    and a date line (3.2: today's date); `llama3_chat` (Llama 3) has none, so the built-in 3.1/3.2
    configs use "auto". Everything after that block is the same text."""
    tok = published(backend, name)
    llama3, auto = get_template("llama3_chat", tok), get_template("auto", tok)
    for conv in CONVS:
        system = conv[0].content.strip() if conv[0].role == "system" else ""
        rest = [m for m in conv if m.role != "system"]
        for msgs, gen in ((conv, False), (prompt_of(conv), True)):
            ours_rest = llama3.render([m for m in msgs if m.role != "system"], gen)
            assert ours_rest.startswith("<|begin_of_text|>")
            expected = LLAMA31_HEADER.format(date="26 Jul 2024", system=system) + ours_rest[len("<|begin_of_text|>"):]
            assert apply(tok, msgs, gen, date_string="26 Jul 2024") == expected
            assert auto.render(msgs, gen) == apply(tok, msgs, gen)
        assert trained(auto, conv) == trained(llama3, rest)
    if name == "Llama-3.1-Instruct":  # 3.1's date is fixed; 3.2 renders today's
        assert "Today Date: 26 Jul 2024" in apply(tok, CONVS[0])


def test_auto_refuses_a_template_that_drops_the_system_message(backend):
    # The shape of Mistral v0.3's template: the system text goes only into a final user message,
    # so a training conversation (ending with a reply) would silently lose it.
    drops = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
             "{% set msgs = messages[1:] %}{% else %}{% set msgs = messages %}{% endif %}{{ bos_token }}"
             "{% for m in msgs %}{% if m['role'] == 'user' %}{% if loop.last and sys is defined %}"
             "{{ '[INST] ' + sys + '\\n\\n' + m['content'] + '[/INST]' }}{% else %}"
             "{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}{% else %}{{ ' ' + m['content'] + eos_token }}"
             "{% endif %}{% endfor %}")
    tok = wrap(backend, "<s>", "</s>", drops)
    auto = get_template("auto", tok)
    assert "You are Bob." in auto.render(prompt_of(CONVS[1]), True)  # kept before a final question
    with pytest.raises(UserError, match="leaves out system message 0") as info:
        auto.segments(CONVS[1])
    assert "prompt_template" in info.value.hint
    assert trained(auto, CONVS[0]) == [("content", "Hello! 你好"), ("eot", "</s>")]


def test_builtin_instruct_configs_use_the_tokenizers_own_template():
    from lmtune.config import list_builtin, load_config

    names = list_builtin()
    assert names
    for name in names:
        cfg = load_config(name)
        assert cfg.prompt_template == "auto", name


# --------------------------------------------------------------------------- SmolLM2 (real tokenizer)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("gen", [False, True])
def test_auto_equals_apply_chat_template(smol_tokenizer, conv, gen):
    tpl = get_template("auto", smol_tokenizer)
    assert tpl.render(conv, add_generation_prompt=gen) == apply(smol_tokenizer, conv, gen)
    assert "".join(s.text for s in tpl.segments(conv, gen)) == apply(smol_tokenizer, conv, gen)


def test_chatml_vs_smollm2_template(smol_tokenizer):
    auto, chatml = get_template("auto", smol_tokenizer), get_template("chatml", smol_tokenizer)
    with_system = CONVS[1]
    assert chatml.render(with_system) == apply(smol_tokenizer, with_system)
    assert chatml.render(with_system, True) == apply(smol_tokenizer, with_system, True)
    # Without a system message SmolLM2's own template adds its default one; "auto" keeps that, a
    # named template adds no system block (the dataset builder injects cfg.system when set).
    no_system = CONVS[0]
    default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert auto.render(no_system) == apply(smol_tokenizer, no_system)
    assert auto.render(no_system).startswith(default)
    assert default + chatml.render(no_system) == auto.render(no_system)
    assert auto.stop_words == chatml.stop_words == ["<|im_end|>"]


def test_auto_segments_mark_reply_and_end_of_turn(smol_tokenizer):
    segs = get_template("auto", smol_tokenizer).segments(CONVS[1])
    trained = [(s.kind, s.text) for s in segs if s.trains]
    assert trained == [("content", "I am Bob."), ("eot", "<|im_end|>"), ("content", "Yes."), ("eot", "<|im_end|>")]
    assert {s.kind for s in segs if not s.trains} == {"prompt", "sep"}


# --------------------------------------------------------------------------- other checks


def test_every_named_template_renders_and_has_stop_words():
    conv = CONVS[1]
    for name in NAMED:
        tpl = get_template(name)
        text = tpl.render(conv)
        assert "I am Bob." in text and "You are Bob." in text and "Who are you?" in text
        assert tpl.stop_words and all(w for w in tpl.stop_words)
        assert any(w in text for w in tpl.stop_words), name
    assert get_template("default").stop_words == ["</s>"]


def test_dict_messages_accepted(smol_tokenizer):
    tpl = get_template("chatml")
    dicts = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tpl.render(dicts) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"


def test_xtuner_template_names_are_accepted(backend):
    tok = published(backend, "Qwen2.5-Instruct")
    assert get_template("qwen_chat", tok).render(CONVS[1]) == get_template("chatml", tok).render(CONVS[1])
    for xtuner_name in ("llama3_chat", "internlm2_chat", "llama2_chat", "mistral", "mixtral", "gemma", "phi3_chat"):
        assert get_template(xtuner_name, tok).render(CONVS[0])


def test_unknown_template_lists_valid_names():
    with pytest.raises(UserError) as info:
        get_template("chatm1")
    msg = str(info.value)
    assert "unknown prompt template 'chatm1'" in msg and "did you mean 'chatml'" in msg
    for name in TEMPLATE_NAMES:
        assert name in msg


def test_auto_without_chat_template(backend):
    tok = wrap(backend, "<s>", "</s>", None)
    with pytest.raises(UserError, match="has no chat template"):
        get_template("auto", tok)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_template_as_jinja_renders_the_same_through_the_tokenizer(name, smol_tokenizer):
    """What export saves as the tokenizer's chat template equals what training rendered."""
    tpl = get_template(name, smol_tokenizer)
    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "line1\nline2"},
         {"role": "assistant", "content": 'a "quoted" reply'}, {"role": "user", "content": "你好"}],
        [{"role": "system", "content": " padded \n"}, {"role": "user", "content": "  q "},
         {"role": "assistant", "content": " a\n"}],
    ]
    for conv in conversations:
        for gen in (False, True):
            ours = tpl.render(conv, add_generation_prompt=gen)
            theirs = smol_tokenizer.apply_chat_template(conv, chat_template=tpl.jinja(), tokenize=False,
                                                        add_generation_prompt=gen)
            assert theirs == ours
