"""The one place that loads a model for inference and generates text from it.

`Engine.load(...)` resolves the model (+ adapters, quantization, device), the chat template, the
default system prompt and the stop words. `engine.stream(messages, ...)` returns a `Generation`:
iterate it for text pieces as they are produced; once exhausted it knows its `finish_reason`
("stop" | "length") and token counts. `engine.generate(...)` is the non-streaming form.

Concurrency: every request goes to one scheduler (`batching.Scheduler`) whose worker thread owns
the model and runs continuous batching: requests that arrive while others decode join the running
batch between decode steps, each with its own KV cache rows, sampling settings and random
generator, and each request's pieces go only to its own `Generation`. Dropping or closing a
`Generation` cancels its request (waiting or running) and frees its row at the next step. The
chat CLI, the web page and the API all use this engine.

Several adapters on one base: `Engine.load(base, adapters={"ada": DIR, "bob": DIR})` serves the
base under its own name and each adapter under its name; `stream(..., model=NAME)` picks one.
Each adapter's `lmtune.json` (template, system prompt, stop words) applies to its requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmtune.data.templates import get_template
from lmtune.errors import UserError
from lmtune.models.generation import stop_token_ids

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class ContextTooLong(ValueError):
    """The newest message alone does not fit in the model's context window."""


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- lmtune.json + template


def read_lmtune_json(*folders: str | None) -> dict:
    """Merge `lmtune.json` from the given folders (later ones win): written by training."""
    merged: dict = {}
    for folder in folders:
        if not folder:
            continue
        f = Path(folder) / "lmtune.json"
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"lmtune.json is not valid JSON: {e}", where=str(f)) from None
            merged.update({k: v for k, v in data.items() if v is not None})
    return merged


# --------------------------------------------------------------------------- one request's output


class Generation:
    """One request's output stream. Iterate (sync or async) for text pieces.

    After the iteration ends: `.text`, `.finish_reason`, `.prompt_tokens`, `.completion_tokens`.
    """

    def __init__(self, prompt_ids, params: dict, loop: asyncio.AbstractEventLoop | None = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self.token_ids: list[int] = []  # the generated tokens
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self._loop = loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._on_cancel = None  # set by the engine: tells the scheduler to free this request's row

    # called from the worker thread
    def _put(self, kind: str, value=None) -> None:
        if self._loop is None:
            self._q.put((kind, value))
            return
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        if self.done.is_set() or self.cancelled.is_set():
            return
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def __iter__(self) -> Iterator[str]:
        if self._loop is not None:
            raise TypeError("this Generation was made for async iteration (async for)")
        try:
            while True:
                kind, value = self._q.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel()  # no-op when finished; stops the job when the consumer walks away

    async def __aiter__(self):
        try:
            while True:
                kind, value = await self._q.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel()

    def result(self) -> Result:
        text = "".join(self)
        return Result(text, self.finish_reason or FINISH_STOP, self.prompt_tokens, self.completion_tokens)


# --------------------------------------------------------------------------- transformers hooks


class _TextCollector:
    """Decodes a request's new tokens, cuts at stop words, forwards safe text to its Generation.

    Text that could be the start of a stop word is held back until it is clearly not one, so a
    stop word never leaks into the output, even partly.
    """

    def __init__(self, gen: Generation, tokenizer, stop_words: list[str]):
        self.gen = gen
        self.tokenizer = tokenizer
        self.stop_words = [w for w in stop_words if w]
        self.ids: list[int] = gen.token_ids
        self.emitted = 0  # characters of the decoded text already sent
        self.stopped_by_word = False

    def add(self, token: int) -> None:
        if self.stopped_by_word:
            return
        self.ids.append(int(token))
        self.gen.completion_tokens = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop_words:
            start = max(0, self.emitted - max(len(w) for w in self.stop_words))
            hits = [i for i in (text.find(w, start) for w in self.stop_words) if i >= 0]
            if hits:
                self._send(text[: min(hits)])
                self.stopped_by_word = True
                return
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            end = len(text.rstrip("\ufffd"))
        end -= self._stop_prefix_len(text[:end])
        self._send(text[:end])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop word."""
        best = 0
        for w in self.stop_words:
            for n in range(min(len(w) - 1, len(text)), best, -1):
                if text.endswith(w[:n]):
                    best = n
                    break
        return best

    def _send(self, upto_text: str) -> None:
        if len(upto_text) > self.emitted:
            piece = upto_text[self.emitted:]
            self.emitted = len(upto_text)
            self.gen.text += piece
            self.gen._put("text", piece)

    def end(self) -> None:
        if not self.stopped_by_word and self.ids:
            # Held-back text that turned out not to be a stop word goes out now.
            self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))


@dataclass
class ServedModel:
    """One name the engine answers to: the base model, or an adapter on it, with its own prompt
    settings (from its lmtune.json)."""

    name: str
    adapter: str | None  # peft adapter name; batching.BASE for the bare base; None: as loaded
    template: object
    system: str | None
    stop_words: list[str]
    eos_ids: list[int]


# --------------------------------------------------------------------------- the engine


class Engine:
    def __init__(self, model, tokenizer, template, *, system: str | None = None, stop_words=(),
                 model_name: str = "model", device: str = "cpu", adapters: dict | None = None,
                 base_adapter: str | None = None, mixed_adapters: bool = True, max_batch: int | None = None,
                 kv_memory_gb: float | None = None, prefill_tokens: int | None = None):
        from lmtune.serve.batching import Scheduler

        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.system = system or None
        self.model_name = model_name
        self.device = device
        self.stop_words = sorted({w for w in [*getattr(template, "stop_words", []), *stop_words] if w})
        self.eos_ids = self._eos_ids()
        self.context_window = self._context_window()
        # the default name's adapter: None (the model as loaded) or BASE (adapters off)
        self._base_adapter = base_adapter
        self.adapters: dict[str, ServedModel] = {}
        for name, (adapter_name, meta) in (adapters or {}).items():
            tpl = get_template(meta.get("prompt_template") or "auto", tokenizer) if meta.get("prompt_template") \
                else template
            words = sorted({w for w in [*getattr(tpl, "stop_words", []), *(meta.get("stop_words") or [])] if w})
            sysm = meta.get("system") if meta.get("system") is not None else self.system
            self.adapters[name] = ServedModel(name, adapter_name, tpl, sysm or None, words,
                                              self._eos_ids(words))
        on_gpu = str(device).startswith("cuda")
        if max_batch is None:
            max_batch = 64
        kv_budget = _kv_budget_bytes(kv_memory_gb, on_gpu)
        if prefill_tokens is None:
            prefill_tokens = 8192 if on_gpu else 512
        self.scheduler = Scheduler(
            model, max_batch=max_batch, kv_budget_bytes=kv_budget, prefill_tokens=prefill_tokens,
            mixed=mixed_adapters, adapter_names=bool(self.adapters),
            on_token=_on_token, on_finish=_on_finish, on_error=_on_error,
        )

    # ---- loading
    @classmethod
    def load(cls, model: str, *, adapter: str | None = None, adapters: dict[str, str] | None = None,
             prompt_template: str | None = None, system: str | None = None, bits: int | None = None,
             device: str = "auto", trust_remote_code: bool = False, model_name: str | None = None,
             max_batch: int | None = None, kv_memory_gb: float | None = None,
             prefill_tokens: int | None = None) -> "Engine":
        """`adapter`: one adapter served under the model's name (the base is not offered).
        `adapters`: {name: folder}, each served under its name, next to the base under its own."""
        import torch
        from transformers.utils import logging as hf_logging

        from lmtune.models.loader import load_model, load_tokenizer, resolve_model_path

        hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter chat and server output

        if adapter and adapters:
            raise UserError("give either one unnamed adapter or named adapters (NAME=DIR), not both")
        path = resolve_model_path(model)
        if adapter:
            adapter = _resolve_adapter(adapter)
        named = {name: _resolve_adapter(d) for name, d in (adapters or {}).items()}
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        meta = read_lmtune_json(path if Path(path).is_dir() else None, adapter)
        quantization = {None: "none", 4: "nf4", 8: "int8"}[bits]
        # float32 on CPU (fast kernels, no half-precision surprises); the model's own dtype on GPU.
        dtype = "float32" if device == "cpu" else "auto"
        extra = f" + adapter {adapter}" if adapter else "".join(f" + {n}={d}" for n, d in named.items())
        _log(f"loading {model}{extra} on {device}…")
        tokenizer = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file()
                                   else path, trust_remote_code=trust_remote_code)
        lm = load_model(path, dtype=dtype, quantization=quantization, device=device, adapter=adapter,
                        trust_remote_code=trust_remote_code)
        served: dict = {}
        mixed = True
        if named:
            lm, mixed = _attach_adapters(lm, named)
            served = {name: (name, read_lmtune_json(path if Path(path).is_dir() else None, d))
                      for name, d in named.items()}
        lm.eval()
        template = get_template(prompt_template or meta.get("prompt_template") or "auto", tokenizer)
        base_name = model_name or _default_model_name(model, adapter)
        if base_name in served:
            raise UserError(f"the adapter name '{base_name}' is also the base model's name",
                            hint="rename the adapter (NAME=DIR) or set --model-name")
        from lmtune.serve.batching import BASE

        return cls(
            lm, tokenizer, template,
            system=system if system is not None else meta.get("system"),
            stop_words=meta.get("stop_words") or [],
            model_name=base_name,
            device=device, adapters=served, base_adapter=BASE if named else None, mixed_adapters=mixed,
            max_batch=max_batch, kv_memory_gb=kv_memory_gb, prefill_tokens=prefill_tokens,
        )

    @property
    def model_names(self) -> list[str]:
        """Every name requests can use: the base (or the single adapter) first, then the adapters."""
        return [self.model_name, *self.adapters]

    def served(self, name: str | None = None) -> ServedModel:
        if name is None or name == self.model_name:
            return ServedModel(self.model_name, self._base_adapter, self.template, self.system,
                               self.stop_words, self.eos_ids)
        try:
            return self.adapters[name]
        except KeyError:
            raise KeyError(name) from None

    def _eos_ids(self, stop_words: list[str] | None = None) -> list[int]:
        # The generation config's eos ids, plus EOS and every stop word that is a single token
        # (e.g. <|im_end|> on a model whose eos is <|endoftext|>): stopping at the token level is
        # what keeps a re-templated model from talking on.
        gc = getattr(self.model, "generation_config", None)
        configured = getattr(gc, "eos_token_id", None)
        ids = set([configured] if isinstance(configured, int) else (configured or []))
        ids.update(stop_token_ids(self.tokenizer, self.stop_words if stop_words is None else stop_words))
        return sorted(int(i) for i in ids)

    def _context_window(self) -> int:
        cfg = getattr(self.model, "config", None)
        n = getattr(cfg, "max_position_embeddings", None) or 2048
        tmax = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tmax, int) and 0 < tmax < n:
            n = tmax
        return int(n)

    # ---- prompts
    def with_system(self, messages: list[dict], system: str | None = None, model: str | None = None) -> list[dict]:
        """Prepend the system prompt (the given one, else the default) unless messages have one."""
        system = system if system is not None else self.served(model).system
        if system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": system}, *messages]
        return list(messages)

    def encode_chat(self, messages: list[dict], model: str | None = None) -> list[int]:
        text = self.served(model).template.render(messages, add_generation_prompt=True)
        # The template writes any special tokens (BOS included) itself.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit_messages(self, messages: list[dict], max_new_tokens: int,
                     model: str | None = None) -> tuple[list[dict], list[int]]:
        """Drop the oldest turns (never the system prompt) until prompt + answer fit the context."""
        messages = list(messages)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        budget = self.context_window - max_new_tokens
        while True:
            ids = self.encode_chat(system + turns, model)
            if len(ids) <= budget or len(turns) <= 1:
                break
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":  # start at a user turn
                turns = turns[1:]
        if len(ids) >= self.context_window:
            raise ContextTooLong(
                f"the prompt is {len(ids)} tokens; this model's context window is {self.context_window}"
            )
        return system + turns, ids

    # ---- generation
    def stream(self, messages: list[dict], *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               max_new_tokens: int = 512, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None, system: str | None = None, model: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Start generating an answer to a conversation; iterate the result for text pieces.
        `model` picks the base or an adapter by its served name (default: the base)."""
        messages = self.with_system(messages, system, model)
        kept, ids = self.fit_messages(messages, max_new_tokens, model)
        return self.submit(ids, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                           repetition_penalty=repetition_penalty, seed=seed, stop=stop, model=model, loop=loop,
                           prefix_len=self._shared_prefix_len(kept, ids, model))

    def _shared_prefix_len(self, messages: list[dict], ids: list[int], model: str | None) -> int:
        """How many leading prompt tokens come before the newest user message's text: the system
        prompt, the history and the turn header, which other requests (or this conversation's next
        turn) share. The scheduler computes their KV cache once and reuses it."""
        if not messages or messages[-1]["role"] != "user":
            return 0
        marker = "\ue000lmtune\ue000"
        try:
            text = self.served(model).template.render([*messages[:-1], {"role": "user", "content": marker}],
                                                      add_generation_prompt=True)
        except Exception:  # noqa: BLE001  (a template that refuses the probe: no sharing, nothing else changes)
            return 0
        head = text.split(marker)[0]
        if not head or marker not in text:
            return 0
        head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        n = 0
        for a, b in zip(head_ids, ids):
            if a != b:
                break
            n += 1
        return n

    def stream_prompt(self, prompt: str, **kw) -> Generation:
        """Continue plain text (no chat template)."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) >= self.context_window:
            raise ContextTooLong(f"the prompt is {len(ids)} tokens; the context window is {self.context_window}")
        return self.submit(ids, **kw)

    def generate(self, messages: list[dict], **kw) -> Result:
        return self.stream(messages, **kw).result()

    def submit(self, prompt_ids: list[int], *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               max_new_tokens: int = 512, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None, model: str | None = None, loop=None,
               prefix_len: int = 0) -> Generation:
        from lmtune.serve.batching import Request

        served = self.served(model)
        max_new_tokens = max(1, min(int(max_new_tokens), self.context_window - len(prompt_ids)))
        params = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k or 0),
                      max_new_tokens=max_new_tokens, repetition_penalty=float(repetition_penalty),
                      seed=seed, stop=list(stop or []))
        gen = Generation(prompt_ids, params, loop=loop)
        collector = _TextCollector(gen, self.tokenizer, [*served.stop_words, *params["stop"]])
        req = Request(gen, list(prompt_ids), served.adapter, frozenset(served.eos_ids), collector,
                      temperature=params["temperature"], top_p=params["top_p"], top_k=params["top_k"],
                      repetition_penalty=params["repetition_penalty"], max_new_tokens=max_new_tokens, seed=seed,
                      prefix_len=prefix_len)
        gen._on_cancel = self.scheduler.wake
        self.scheduler.submit(req)
        return gen

    def pending(self) -> int:
        """Requests waiting for a row in the batch."""
        return self.scheduler.waiting()

    def close(self) -> None:
        """Stop generating (requests in flight end as cancelled); the model can then be freed."""
        self.scheduler.close()


# --------------------------------------------------------------------------- scheduler callbacks
# (called on the scheduler's worker thread)


def _on_token(req, token: int) -> None:
    req.collector.add(token)


def _on_finish(req, reason: str) -> None:
    gen = req.gen
    if not gen.cancelled.is_set():
        req.collector.end()
    gen.finish_reason = reason
    gen._put("end")
    gen.done.set()


def _on_error(req, error: Exception) -> None:
    req.gen._put("error", error)
    req.gen.done.set()


def _kv_budget_bytes(kv_memory_gb: float | None, on_gpu: bool) -> int:
    """How much memory the batch's KV cache may take: the given GB, else most of what is free
    (GPU: 80% of free device memory after loading; CPU: half of the available RAM)."""
    if kv_memory_gb is not None:
        return int(kv_memory_gb * 2**30)
    if on_gpu:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _attach_adapters(model, named: dict[str, str]):
    """Put every named LoRA adapter on `model` (one peft model), and find out whether rows of
    different adapters can share a forward pass (peft's `adapter_names`)."""
    import torch
    from peft import PeftModel

    names = list(named)
    model = PeftModel.from_pretrained(model, named[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(named[name], adapter_name=name)
    model.eval()
    probe = torch.zeros(2, 1, dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            model(input_ids=probe, adapter_names=[names[0], "__base__"])
        mixed = True
    except (ValueError, TypeError, NotImplementedError) as e:
        _log(f"these adapters cannot share a batch ({e}); they take turns")
        mixed = False
    return model, mixed


def _resolve_adapter(adapter: str) -> str:
    p = Path(adapter).expanduser()
    if (p / "adapter_config.json").is_file():
        return str(p)
    if (p / "hf" / "adapter_config.json").is_file():  # a training work dir
        return str(p / "hf")
    if not p.exists():
        raise UserError(f"adapter folder '{adapter}' does not exist")
    raise UserError(f"'{adapter}' is not a LoRA adapter folder: it has no adapter_config.json")


def _default_model_name(model: str, adapter: str | None) -> str:
    p = Path(adapter or model)
    if not p.exists():
        return str(model)
    p = p.resolve()
    return p.parent.name if p.name == "hf" else p.name
