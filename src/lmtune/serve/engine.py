"""The one place that loads a model for inference and generates text from it.

`Engine.load(...)` resolves the model (+ adapter, quantization, device), the chat template, the
default system prompt and the stop words. `engine.stream(messages, ...)` returns a `Generation`:
iterate it for text pieces as they are produced; once exhausted it knows its `finish_reason`
("stop" | "length") and token counts. `engine.generate(...)` is the non-streaming form.

Concurrency: every request becomes a job on one FIFO queue served by one worker thread that owns
the model, so generations never interleave and each request's pieces go only to its own
`Generation`. Dropping or closing a `Generation` cancels its job (queued or running).
"""

from __future__ import annotations

import asyncio
import json
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
        self.cancelled.set()

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
    """A transformers streamer: decodes new tokens, cuts at stop words, forwards safe text.

    Text that could be the start of a stop word is held back until it is clearly not one, so a
    stop word never leaks into the output, even partly.
    """

    def __init__(self, gen: Generation, tokenizer, stop_words: list[str]):
        self.gen = gen
        self.tokenizer = tokenizer
        self.stop_words = [w for w in stop_words if w]
        self.longest_stop = max((len(w) for w in self.stop_words), default=0)
        self.ids: list[int] = gen.token_ids
        self.emitted = 0  # characters of the decoded text already sent
        self.stopped_by_word = False
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        if self.stopped_by_word:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.gen.completion_tokens = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop_words:
            start = max(0, self.emitted - self.longest_stop)
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


def _stopping_criteria(gen: Generation, collector: _TextCollector):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = collector.stopped_by_word or gen.cancelled.is_set()
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


# --------------------------------------------------------------------------- the engine


class Engine:
    def __init__(self, model, tokenizer, template, *, system: str | None = None, stop_words=(),
                 model_name: str = "model", device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.system = system or None
        self.model_name = model_name
        self.device = device
        self.stop_words = sorted({w for w in [*getattr(template, "stop_words", []), *stop_words] if w})
        self.eos_ids = self._eos_ids()
        self.context_window = self._context_window()
        self._jobs: queue.Queue[Generation] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # ---- loading
    @classmethod
    def load(cls, model: str, *, adapter: str | None = None, prompt_template: str | None = None,
             system: str | None = None, bits: int | None = None, device: str = "auto",
             trust_remote_code: bool = False, model_name: str | None = None) -> "Engine":
        import torch
        from transformers.utils import logging as hf_logging

        from lmtune.models.loader import load_model, load_tokenizer, resolve_model_path

        hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter chat and server output

        path = resolve_model_path(model)
        if adapter:
            adapter = _resolve_adapter(adapter)
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        meta = read_lmtune_json(path if Path(path).is_dir() else None, adapter)
        quantization = {None: "none", 4: "nf4", 8: "int8"}[bits]
        # float32 on CPU (fast kernels, no half-precision surprises); the model's own dtype on GPU.
        dtype = "float32" if device == "cpu" else "auto"
        _log(f"loading {model}" + (f" + adapter {adapter}" if adapter else "") + f" on {device}…")
        tokenizer = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file()
                                   else path, trust_remote_code=trust_remote_code)
        lm = load_model(path, dtype=dtype, quantization=quantization, device=device, adapter=adapter,
                        trust_remote_code=trust_remote_code)
        lm.eval()
        template = get_template(prompt_template or meta.get("prompt_template") or "auto", tokenizer)
        return cls(
            lm, tokenizer, template,
            system=system if system is not None else meta.get("system"),
            stop_words=meta.get("stop_words") or [],
            model_name=model_name or _default_model_name(model, adapter),
            device=device,
        )

    def _eos_ids(self) -> list[int]:
        # The generation config's eos ids, plus EOS and every stop word that is a single token
        # (e.g. <|im_end|> on a model whose eos is <|endoftext|>): stopping at the token level is
        # what keeps a re-templated model from talking on.
        gc = getattr(self.model, "generation_config", None)
        configured = getattr(gc, "eos_token_id", None)
        ids = set([configured] if isinstance(configured, int) else (configured or []))
        ids.update(stop_token_ids(self.tokenizer, self.stop_words))
        return sorted(int(i) for i in ids)

    def _context_window(self) -> int:
        cfg = getattr(self.model, "config", None)
        n = getattr(cfg, "max_position_embeddings", None) or 2048
        tmax = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tmax, int) and 0 < tmax < n:
            n = tmax
        return int(n)

    # ---- prompts
    def with_system(self, messages: list[dict], system: str | None = None) -> list[dict]:
        """Prepend the system prompt (the given one, else the default) unless messages have one."""
        system = system if system is not None else self.system
        if system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": system}, *messages]
        return list(messages)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True)
        # The template writes any special tokens (BOS included) itself.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit_messages(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], list[int]]:
        """Drop the oldest turns (never the system prompt) until prompt + answer fit the context."""
        messages = list(messages)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        budget = self.context_window - max_new_tokens
        while True:
            ids = self.encode_chat(system + turns)
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
               stop: list[str] | None = None, system: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Start generating an answer to a conversation; iterate the result for text pieces."""
        messages = self.with_system(messages, system)
        _, ids = self.fit_messages(messages, max_new_tokens)
        return self.submit(ids, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                           repetition_penalty=repetition_penalty, seed=seed, stop=stop, loop=loop)

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
               stop: list[str] | None = None, loop=None) -> Generation:
        max_new_tokens = max(1, min(int(max_new_tokens), self.context_window - len(prompt_ids)))
        params = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k or 0),
                      max_new_tokens=max_new_tokens, repetition_penalty=float(repetition_penalty),
                      seed=seed, stop=list(stop or []))
        gen = Generation(prompt_ids, params, loop=loop)
        self._ensure_worker()
        self._jobs.put(gen)
        return gen

    def pending(self) -> int:
        return self._jobs.qsize()

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="lmtune-generate", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            gen = self._jobs.get()
            if gen.cancelled.is_set():
                gen.finish_reason = FINISH_STOP
                gen._put("end")
                gen.done.set()
                continue
            try:
                self._run(gen)
                gen._put("end")
            except Exception as e:  # report to the requester; the worker lives on
                gen._put("error", e)
            finally:
                gen.done.set()

    def _run(self, gen: Generation) -> None:
        import torch
        from transformers import GenerationConfig

        p = gen.params
        collector = _TextCollector(gen, self.tokenizer, [*self.stop_words, *p["stop"]])
        do_sample = p["temperature"] > 0
        config = GenerationConfig(
            max_new_tokens=p["max_new_tokens"],
            do_sample=do_sample,
            temperature=p["temperature"] if do_sample else None,
            top_p=p["top_p"] if do_sample and p["top_p"] < 1.0 else None,
            top_k=p["top_k"] if do_sample and p["top_k"] > 0 else None,
            repetition_penalty=p["repetition_penalty"] if p["repetition_penalty"] != 1.0 else None,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else
            (self.eos_ids[0] if self.eos_ids else 0),
        )
        ids = torch.tensor([gen.prompt_ids], dtype=torch.long, device=self._input_device())
        # A request's seed must not reseed the process: later unseeded requests stay random.
        devices = [self._input_device()] if self._input_device().type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=p["seed"] is not None):
            if p["seed"] is not None:
                torch.manual_seed(int(p["seed"]))
            self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                streamer=collector, stopping_criteria=_stopping_criteria(gen, collector),
            )
        collector.end()
        hit_eos = bool(collector.ids) and collector.ids[-1] in self.eos_ids
        if collector.stopped_by_word or hit_eos or gen.cancelled.is_set():
            gen.finish_reason = FINISH_STOP
        else:
            gen.finish_reason = FINISH_LENGTH

    def _input_device(self):
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return self.device


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
