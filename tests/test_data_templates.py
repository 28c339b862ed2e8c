"""Chat templates: our rendering equals the tokenizer's own apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtune.data.conversation import Message
from lmtune.data.templates import NAMED, TEMPLATE_NAMES, get_template
from lmtune.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|system|>",
           "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<｜begin▁of▁sentence｜>",
           "<｜end▁of▁sentence｜>"]

# Reference Jinja templates as published with each model family's checkpoints (trimmed of their
# error checks where those do not change the text).
REFERENCE = {
    "llama3_chat": ("<|begin_of_text|>", "<|eot_id|>",
                    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
                    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma": ("<bos>", "<eos>",
              "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
              "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
              "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"),
    "mistral": ("<s>", "</s>",
                "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token}}{% endif %}{% endfor %}"),
    "llama2_chat": ("<s>", "</s>",
                    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
                    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
                    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
                    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
                    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                 "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
                 "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
                 "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"),
    "phi3_chat": ("<s>", "<|endoftext|>",
                  "{% for message in messages %}{% if message['role'] == 'system' %}"
                  "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
                  "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
                  "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}

CONVS = [
    [Message("user", "Hi"), Message("assistant", "Hello! 你好")],
    [Message("system", "You are Bob."), Message("user", "Who are you?"), Message("assistant", "I am Bob."),
     Message("user", "Sure?"), Message("assistant", "Yes.")],
    [Message("user", "One"), Message("assistant", "Two"), Message("user", "Three"), Message("assistant", "Four")],
]


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


def apply(tok, msgs, gen=False):
    return tok.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs], tokenize=False,
                                   add_generation_prompt=gen)


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


# --------------------------------------------------------------------------- other families


def test_internlm2_chat_equals_checkpoint_template(backend):
    cfg = json.loads((FIXTURES / "internlm2" / "tokenizer_config.json").read_text())
    tok = wrap(backend, "<s>", "</s>", cfg["chat_template"])
    ours = get_template("internlm2_chat", tok)
    for conv in CONVS:
        assert ours.render(conv) == apply(tok, conv)
        assert ours.render(conv, True) == apply(tok, conv, True)
    assert ours.render(CONVS[1]).startswith("<s><|im_start|>system\nYou are Bob.<|im_end|>\n<|im_start|>user\n")
    assert ours.stop_words == ["<|im_end|>"]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_named_equals_reference_template(backend, name):
    bos, eos, jinja = REFERENCE[name]
    tok = wrap(backend, bos, eos, jinja)
    ours, auto = get_template(name, tok), get_template("auto", tok)
    convs = CONVS if name not in ("gemma", "mistral") else [c for c in CONVS if c[0].role != "system"]
    for conv in convs:
        assert ours.render(conv) == apply(tok, conv), name
        # The auto template finds the same reply + end-of-turn spans as the named one.
        named_trained = [(s.kind, s.text) for s in ours.segments(conv) if s.trains]
        auto_trained = [(s.kind, s.text) for s in auto.segments(conv) if s.trains]
        assert named_trained == auto_trained, name
    if name not in ("mistral", "llama2_chat"):  # those two have no generation prompt
        assert ours.render(convs[0], True) == apply(tok, convs[0], True)


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
    ]
    for conv in conversations:
        for gen in (False, True):
            ours = tpl.render(conv, add_generation_prompt=gen)
            theirs = smol_tokenizer.apply_chat_template(conv, chat_template=tpl.jinja(), tokenize=False,
                                                        add_generation_prompt=gen)
            assert theirs == ours
