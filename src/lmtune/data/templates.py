"""Chat templates: the one place that turns messages into text.

A template renders a conversation as a list of `Segment`s (text pieces that say whether they
carry loss); `render()` is simply their concatenation, so the text a model is trained on and the
text the label mask is computed from are the same string by construction.

Two kinds:
  * named templates (chatml, llama3_chat, ...): written here as a few format strings each. They add
    no system block unless the conversation has a system message (the dataset builder injects the
    config's `system` when it is set). Each renders exactly what the published chat template of the
    model family it names renders (tests/test_data_templates.py checks this against the published
    strings in tests/fixtures/chat_templates/), with these deliberate differences:
      - no default system prompt: Qwen2.5's template adds "You are Qwen, created by Alibaba Cloud..."
        when a conversation has none, SmolLM2's its own; `chatml` does not (use "auto" for that);
      - `llama3_chat` is Llama 3 (Meta-Llama-3-8B-Instruct). Llama 3.1/3.2 always open with a system
        block carrying "Cutting Knowledge Date" / "Today Date" lines (3.2: today's date): use "auto";
      - where the published template refuses a system message (Gemma, Mixtral/Mistral v0.1), the
        named template puts it before the first user message's text instead of failing.
  * "auto": the tokenizer's own Jinja chat template through `tokenizer.apply_chat_template`, so our
    text equals the tokenizer's exactly (including e.g. SmolLM2's default system prompt). Segments
    are found by rendering the conversation prefix by prefix.

An assistant message becomes four segments: "prompt" (its header, e.g. "<|im_start|>assistant\\n",
no loss), "content" (the reply), "eot" (the end-of-turn marker, e.g. "<|im_end|>", plus EOS where the
template puts one: trained with the reply, so the model learns to stop) and "sep" (whatever follows,
e.g. "\\n": no loss).
"""

from __future__ import annotations

import json

import difflib
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from lmtune.data.conversation import Message
from lmtune.data.images import IMAGE_PLACEHOLDER, PARTS_MARK
from lmtune.errors import UserError


@dataclass(frozen=True)
class Segment:
    text: str
    trains: bool
    kind: str  # "prompt" | "content" | "eot" | "sep"
    message: int = -1  # index of the message it belongs to (-1: bos / generation prompt)


MessageLike = Union[Message, dict]


def as_messages(messages: Iterable[MessageLike]) -> list[Message]:
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
        else:
            out.append(Message(m["role"], m["content"], m.get("loss")))
    return out


class ChatTemplate:
    name: str
    stop_words: list[str]

    def segments(self, messages: Iterable[MessageLike], add_generation_prompt: bool = False) -> list[Segment]:
        raise NotImplementedError

    def render(self, messages: Iterable[MessageLike], add_generation_prompt: bool = False) -> str:
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))

    def __repr__(self) -> str:
        return f"<ChatTemplate {self.name}>"


# --------------------------------------------------------------------------- named templates


@dataclass(frozen=True)
class NamedSpec:
    user: str  # format with {content}
    assistant_prefix: str
    eot: str  # trained with the reply; "{eos}" is the tokenizer's EOS token
    sep: str = ""
    bos: str = ""
    system: Optional[str] = None  # format with {content}; None: merged into the first user message
    system_merge: str = "{system}\n\n{content}"
    generation_prompt: Optional[str] = None  # default: assistant_prefix
    stop_words: tuple = ()
    trim: bool = False  # strip whitespace around each message's text, as the published template does
    # Appended after the last message when no generation prompt follows (Phi-3 ends with its EOS).
    # After a final reply it is trained with that reply's end of turn, as "auto" would train it.
    end: str = ""


_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    eot="<|im_end|>",
    sep="\n",
    stop_words=("<|im_end|>",),
)

NAMED: dict[str, NamedSpec] = {
    # Qwen, SmolLM2 and other ChatML models.
    "chatml": NamedSpec(**_CHATML),
    # InternLM2-chat: ChatML behind a "<s>" BOS, exactly as the checkpoint's own template.
    "internlm2_chat": NamedSpec(bos="<s>", **_CHATML),
    "llama3_chat": NamedSpec(
        bos="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        eot="<|eot_id|>",
        stop_words=("<|eot_id|>", "<|end_of_text|>"),
        trim=True,
    ),
    "llama2_chat": NamedSpec(
        user="<s>[INST] {content} [/INST]",
        system_merge="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        assistant_prefix=" ",
        generation_prompt="",  # the published template has none: a prompt ends with "[/INST]"
        eot=" </s>",
        stop_words=("</s>",),
        trim=True,
    ),
    # Mistral-7B-Instruct-v0.1 / Mixtral-8x7B-Instruct-v0.1 (XTuner's "mistral"). Mistral v0.3 writes
    # "[INST] Hi[/INST] Hello</s>": use "auto" for it.
    "mistral": NamedSpec(
        bos="<s>",
        user="[INST] {content} [/INST]",
        assistant_prefix="",
        eot="</s>",
        stop_words=("</s>",),
    ),
    "gemma": NamedSpec(
        bos="<bos>",
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        assistant_prefix="<start_of_turn>model\n",
        eot="<end_of_turn>",
        sep="\n",
        stop_words=("<end_of_turn>",),
        trim=True,
    ),
    "phi3_chat": NamedSpec(
        system="<|system|>\n{content}<|end|>\n",
        user="<|user|>\n{content}<|end|>\n",
        assistant_prefix="<|assistant|>\n",
        eot="<|end|>",
        sep="\n",
        end="{eos}",
        stop_words=("<|end|>", "<|endoftext|>"),
    ),
    # deepseek-llm-chat
    "deepseek": NamedSpec(
        bos="<｜begin▁of▁sentence｜>",
        system="{content}\n\n",
        user="User: {content}\n\n",
        assistant_prefix="Assistant: ",
        generation_prompt="Assistant:",
        eot="<｜end▁of▁sentence｜>",
        stop_words=("<｜end▁of▁sentence｜>",),
    ),
    # A plain template for base models without one; ends each reply with the tokenizer's EOS.
    "default": NamedSpec(
        system="{content}\n\n",
        user="User: {content}\n",
        assistant_prefix="Assistant: ",
        eot="{eos}",
        sep="\n",
        stop_words=("{eos}",),
    ),
}

# XTuner's names for the same formats, accepted so users' XTuner-style configs keep working.
XTUNER_NAMES = {"qwen_chat": "chatml", "mixtral": "mistral"}

TEMPLATE_NAMES: tuple[str, ...] = ("auto",) + tuple(NAMED)


class NamedTemplate(ChatTemplate):
    def __init__(self, name: str, spec: NamedSpec, tokenizer=None):
        self.name = name
        self.spec = spec
        eos = getattr(tokenizer, "eos_token", None) or "</s>"
        self._eos = eos
        self.stop_words = list(dict.fromkeys(w.replace("{eos}", eos) for w in spec.stop_words))

    def segments(self, messages, add_generation_prompt=False):
        msgs = as_messages(messages)
        spec = self.spec

        def text(t: str) -> str:
            return t.strip() if spec.trim else t

        segs = [Segment(spec.bos, False, "prompt")] if spec.bos else []
        pending_system = None  # system text waiting to be merged into the first user message
        for i, m in enumerate(msgs):
            if m.role == "system":
                if spec.system is None:
                    pending_system = m.content
                else:
                    segs.append(Segment(spec.system.format(content=text(m.content)), m.trains(), "prompt", i))
            elif m.role == "user":
                content = m.content
                if pending_system is not None:
                    content = spec.system_merge.format(system=pending_system, content=content)
                    pending_system = None
                segs.append(Segment(spec.user.format(content=text(content)), m.trains(), "prompt", i))
            elif m.role == "assistant":
                if pending_system is not None:  # a system message with no user message after it
                    segs.append(Segment(spec.user.format(content=text(pending_system)), False, "prompt", 0))
                    pending_system = None
                t = m.trains()
                if spec.assistant_prefix:
                    segs.append(Segment(spec.assistant_prefix, False, "prompt", i))
                segs.append(Segment(text(m.content), t, "content", i))
                segs.append(Segment(self._lit(spec.eot), t, "eot", i))
                if spec.sep:
                    segs.append(Segment(spec.sep, False, "sep", i))
            else:
                raise UserError(f"unknown role {m.role!r}; roles are system, user, assistant")
        if pending_system is not None:
            segs.append(Segment(spec.user.format(content=text(pending_system)), False, "prompt", 0))
        if add_generation_prompt:
            gp = spec.assistant_prefix if spec.generation_prompt is None else spec.generation_prompt
            segs.append(Segment(gp, False, "prompt"))
        elif spec.end:
            end = self._lit(spec.end)
            last = segs[-1] if segs else None
            if last is not None and last.kind == "sep" and segs[-2].kind == "eot":
                # After a final reply: one end of turn through the closing token, as "auto" has it.
                eot = segs[-2]
                segs[-2:] = [Segment(eot.text + last.text + end, eot.trains, "eot", eot.message)]
            elif last is not None and last.kind == "eot":
                segs[-1] = Segment(last.text + end, last.trains, "eot", last.message)
            else:
                segs.append(Segment(end, False, "prompt"))
        return [s for s in segs if s.text]

    def _lit(self, text: str) -> str:
        return text.replace("{eos}", self._eos)

    def jinja(self) -> str:
        """The same template as a Jinja chat template, saved with exported tokenizers so every
        other tool (transformers' apply_chat_template, vLLM, the exported app) renders exactly
        what the model was trained on."""
        spec = self.spec

        def lit(text: str) -> str:
            text = self._lit(text)
            return "{{ " + json.dumps(text) + " }}" if text else ""

        def expr(text: str) -> str:  # a literal as a Jinja expression
            return json.dumps(self._lit(text))

        def around(fmt: str, key: str) -> tuple[str, str]:
            before, _, after = fmt.partition("{" + key + "}")
            return before, after

        def shown(var: str) -> str:
            return "{{ " + var + (" | trim" if spec.trim else "") + " }}"

        user_pre, user_post = around(spec.user, "content")
        merge_pre, rest = around(spec.system_merge, "system")
        merge_mid, merge_post = around(rest, "content")
        merged = f"{expr(merge_pre)} ~ ns.system ~ {expr(merge_mid)} ~ m['content'] ~ {expr(merge_post)}"
        if spec.system is None:
            on_system = "{% set ns.system = m['content'] %}"
        else:
            sys_pre, sys_post = around(spec.system, "content")
            on_system = lit(sys_pre) + shown("m['content']") + lit(sys_post)
        gp = spec.assistant_prefix if spec.generation_prompt is None else spec.generation_prompt
        return (
            lit(spec.bos) + "{% set ns = namespace(system=none) %}{% for m in messages %}"
            "{% if m['role'] == 'system' %}" + on_system
            + "{% elif m['role'] == 'user' %}"
            "{% if ns.system is not none %}{% set c = " + merged + " %}{% set ns.system = none %}"
            "{% else %}{% set c = m['content'] %}{% endif %}" + lit(user_pre) + shown("c") + lit(user_post)
            + "{% elif m['role'] == 'assistant' %}" + lit(spec.assistant_prefix) + shown("m['content']")
            + lit(spec.eot) + lit(spec.sep) + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + lit(gp)
            + ("{% else %}" + lit(spec.end) if spec.end else "") + "{% endif %}"
        )


# --------------------------------------------------------------------------- the tokenizer's own


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search for the first difference
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def image_parts(content: str) -> list[dict]:
    """Message text as content parts: each `<image>` (with the newline after it, which belongs to
    the image in LLaVA's convention) becomes an image part."""
    parts = []
    for k, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's Jinja chat template ("auto").

    A vision-language model's template renders images from content parts ({"type": "image"}) as
    its own placeholder text; for such a template (one that mentions images) every message is
    passed as parts (`image_parts`), `<image>` in the text becoming an image part.
    """

    def __init__(self, tokenizer):
        self.name = "auto"
        self.tokenizer = tokenizer
        source = getattr(tokenizer, "chat_template", None)
        self.image_parts = isinstance(source, str) and "image" in source and PARTS_MARK not in source
        special = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(tok, "special", False):
                special.add(tok.content)
        self._special = sorted((s for s in special if s), key=len, reverse=True)
        words = []
        probe = [Message("user", "Hi"), Message("assistant", "Hello")]
        try:
            for s in self.segments(probe):
                if s.kind == "eot":
                    words += [w for w in self._special if w in s.text]
        except UserError:
            pass
        eos = getattr(tokenizer, "eos_token", None)
        if eos:
            words.append(eos)
        self.stop_words = list(dict.fromkeys(words))

    def _apply(self, msgs: list[Message], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": image_parts(m.content) if self.image_parts else m.content}
                 for m in msgs],
                tokenize=False, add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as e:  # e.g. Gemma's "System role not supported"
            roles = ", ".join(m.role for m in msgs) or "none"
            raise UserError(
                f"the tokenizer's chat template refuses this conversation: {e} (its roles: {roles})",
                hint="remove what it refuses (a system message may come from the config's `system`), or set "
                     f"prompt_template to a named template ({', '.join(NAMED)})",
            ) from None

    def render(self, messages, add_generation_prompt=False):
        return self._apply(as_messages(messages), add_generation_prompt)

    def _eot_end(self, text: str, start: int, end: int) -> int:
        """End of the trained end-of-turn part of text[start:end]: through its last special token."""
        suffix = text[start:end]
        last = -1
        for w in self._special:
            k = suffix.rfind(w)
            if k >= 0:
                last = max(last, k + len(w))
        return start + last if last >= 0 else end

    def segments(self, messages, add_generation_prompt=False):
        msgs = as_messages(messages)
        full = self._apply(msgs, add_generation_prompt)
        for i, m in enumerate(msgs):
            # Mistral v0.3's template keeps the system message only before a final user message: a
            # training conversation (ending with a reply) would silently lose it.
            if m.role == "system" and m.content.strip() and m.content.strip() not in full:
                raise UserError(
                    f"the tokenizer's chat template leaves out system message {i} of this conversation, "
                    "so the model would never be trained with it",
                    hint="remove the system message (it may come from the config's `system`), or set "
                         f"prompt_template to a named template ({', '.join(NAMED)})",
                )
        segs: list[Segment] = []
        pos = 0

        def cut(text: str) -> int:
            return _common_prefix_len(text, full)

        def broken(i: int) -> UserError:
            return UserError(
                f"the tokenizer's chat template does not render message {i} as a continuation of the "
                "messages before it, so the loss mask cannot be derived from it",
                hint=f"set prompt_template to a named template ({', '.join(NAMED)})",
            )

        # Only trained messages need their boundaries found; untrained text between them is one
        # "prompt" segment. The last reply's end is the end of `full` and needs no extra render.
        last = len(msgs) - 1
        for i, m in enumerate(msgs):
            if not m.trains():
                continue
            if m.role != "assistant":  # a message with loss=True: train its whole block
                start = cut(self._apply(msgs[:i], False)) if i else 0
                end = cut(self._apply(msgs[: i + 1], False))
                if start < pos or end < start:
                    raise broken(i)
                segs += [Segment(full[pos:start], False, "prompt", i), Segment(full[start:end], True, "prompt", i)]
                pos = end
                continue
            try:
                head = cut(self._apply(msgs[:i], True)) if i else pos
            except Exception:  # some templates cannot render an empty list
                head = pos
            end = len(full) if i == last and not add_generation_prompt else cut(self._apply(msgs[: i + 1], False))
            if head < pos or end < head:
                raise broken(i)
            # The reply as written, or stripped where the template trims it (Llama 3, Gemma).
            body = m.content
            k = full.find(body, head, end) if body else -1
            if k < 0 and body.strip() and body.strip() != body:
                body = body.strip()
                k = full.find(body, head, end)
            if k < 0:
                raise broken(i)
            content_end = k + len(body)
            eot_end = self._eot_end(full, content_end, end)
            segs += [
                Segment(full[pos:k], False, "prompt", i),
                Segment(full[k:content_end], True, "content", i),
                Segment(full[content_end:eot_end], True, "eot", i),
                Segment(full[eot_end:end], False, "sep", i),
            ]
            pos = end
        segs.append(Segment(full[pos:], False, "prompt"))
        return [s for s in segs if s.text]


# --------------------------------------------------------------------------- lookup


def get_template(name: str, tokenizer=None) -> ChatTemplate:
    """A template by name; "auto" uses `tokenizer`'s own chat template."""
    if name == "auto":
        if tokenizer is None:
            raise UserError("prompt_template 'auto' needs a tokenizer (it uses the tokenizer's own chat template)")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the tokenizer has no chat template, so prompt_template 'auto' cannot be used",
                hint=f"set prompt_template to one of: {', '.join(NAMED)}",
            )
        return TokenizerTemplate(tokenizer)
    name = XTUNER_NAMES.get(name, name)
    if name in NAMED:
        return NamedTemplate(name, NAMED[name], tokenizer)
    near = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
    hint = (f"did you mean '{near[0]}'? " if near else "") + f"valid names: {', '.join(TEMPLATE_NAMES)}"
    raise UserError(f"unknown prompt template '{name}'", where="prompt_template", hint=hint)
