"""Generation for models that see images: `lmtune chat --image`, image upload in `lmtune web`,
`image_url` parts in `lmtune serve`.

`VisionEngine` offers what the chat CLI, the web page and the API use of `engine.Engine`
(`stream`, `generate`, `model_name`, `system`, ...) plus an `images=` argument, and serves one
request at a time with transformers' `generate`: the continuous-batching scheduler of engine.py
keeps one KV cache row per request for text and has no place for image features yet.

A prompt is built exactly as training builds a sample: the template renders the messages (an
image is `<image>` in the text), the tokenizer tokenizes, each image token is expanded by the
model kind (`image_tokens`), and the pixels come from the model's image processor. So what
`lmtune chat --image` feeds the model is what it was trained on, and what the exported folder's
own processor makes (tests/test_vision_serve.py compares the generated tokens).

    lmtune chat MODEL --image IMG                       a vision-language folder (or its work dir)
    lmtune chat LLM --visual-encoder VIT --llava DIR     the tutorial's form; DIR is a trained LLaVA
                                                         folder / work dir, or a checkpoint (iter_N)
                                                         whose projector, LoRA and tower weights are
                                                         put onto LLM + VIT
"""

from __future__ import annotations

import base64
import dataclasses
import queue
import sys
import threading
from pathlib import Path

from lmtune.data.images import IMAGE_PLACEHOLDER
from lmtune.errors import UserError
from lmtune.serve.engine import (FINISH_LENGTH, FINISH_STOP, ContextTooLong, Generation, _default_model_name,
                                 _resolve_adapter, _TextCollector, read_lmtune_json)

MAX_REMOTE_IMAGE_BYTES = 20 << 20


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


def sees_images(model: str) -> bool:
    """Whether `model` (a folder, work dir, adapter folder or hub id) is a vision-language model."""
    from lmtune.models.loader import is_vision_language
    from lmtune.models.vision import read_model_config

    return is_vision_language(read_model_config(model))


# --------------------------------------------------------------------------- image references


def image_ref(url: str, *, allow_remote: bool = False) -> str:
    """An image reference from an OpenAI `image_url` (a data: URL, a local path or file:// URL; a
    remote http(s) URL only when allowed, then fetched into a data: URL)."""
    if not isinstance(url, str) or not url:
        raise UserError("an image_url part needs a non-empty 'url'")
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise UserError("remote image URLs are not fetched by this server",
                            hint="send the image as a data: URL, or start the server with --allow-remote-images")
        return _fetch(url)
    path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
    if not path.is_file():
        raise UserError(f"image '{url}' is not a file on the server")
    return str(path)


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=20) as r:  # noqa: S310 (an http(s) URL the operator allowed)
        data = r.read(MAX_REMOTE_IMAGE_BYTES + 1)
        kind = r.headers.get_content_type() or "image/png"
    if len(data) > MAX_REMOTE_IMAGE_BYTES:
        raise UserError(f"image at {url} is larger than {MAX_REMOTE_IMAGE_BYTES >> 20} MB")
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


# --------------------------------------------------------------------------- loading


def _load_llava_checkpoint(ckpt: Path, llm: str, tower: str, device: str, dtype: str):
    """A training checkpoint (iter_N) of a composed LLaVA: LLM + tower composed again, its trained
    weights (projector, adapters, tower) put on. Returns (kind, cfg, model)."""
    import torch
    from safetensors.torch import load_file

    from lmtune.config import load_config
    from lmtune.models.kinds import model_kind

    cfg = load_config(str(ckpt / "config.py"))
    cfg = dataclasses.replace(cfg, model=llm, vision_tower=tower, quantization="none", projector=None)
    cfg._source = str(ckpt / "config.py")
    kind = model_kind(cfg)
    kind.load_tokenizer(cfg)
    model = kind.load(cfg, torch.device(device), dtype=dtype)
    if cfg.method == "lora":
        model = kind.add_lora(model, cfg)
    weights = load_file(str(ckpt / "model.safetensors"))
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise UserError(f"checkpoint {ckpt} does not fit {llm} + {tower} (e.g. '{unknown[0]}')",
                        hint="give the LLM and the vision tower it was trained with")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    return kind, cfg, model


class VisionEngine:
    sees_images = True

    def __init__(self, model, kind, tokenizer, template, *, system=None, stop_words=(), model_name="model",
                 device="cpu"):
        from lmtune.models.generation import stop_token_ids

        self.model, self.kind, self.tokenizer, self.template = model, kind, tokenizer, template
        self.system = system or None
        self.model_name = model_name
        self.device = device
        self.stop_words = sorted({w for w in [*getattr(template, "stop_words", []), *stop_words] if w})
        gc = getattr(model, "generation_config", None)
        configured = getattr(gc, "eos_token_id", None)
        ids = set([configured] if isinstance(configured, int) else (configured or []))
        self.eos_ids = sorted(int(i) for i in ids | set(stop_token_ids(tokenizer, self.stop_words)))
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context_window = int(getattr(text_cfg, "max_position_embeddings", None) or 4096)
        self.scheduler = _OneAtATime()
        self._jobs: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str, *, adapter: str | None = None, prompt_template: str | None = None,
             system: str | None = None, bits: int | None = None, device: str = "auto",
             trust_remote_code: bool = False, model_name: str | None = None, llava: str | None = None,
             visual_encoder: str | None = None) -> "VisionEngine":
        import torch
        from transformers.utils import logging as hf_logging

        from lmtune.config import validate
        from lmtune.data.templates import get_template
        from lmtune.models.kinds import model_kind
        from lmtune.models.loader import resolve_model_path

        hf_logging.disable_progress_bar()
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "float32" if device == "cpu" else "auto"
        quantization = {None: "none", 4: "nf4", 8: "int8"}[bits]
        if llava is not None:
            folder = Path(llava).expanduser()
            ckpt = folder if (folder / "model.safetensors").is_file() and (folder / "config.py").is_file() else None
            if ckpt is not None:
                if not visual_encoder:
                    raise UserError("--llava with a training checkpoint needs --visual-encoder (the vision tower)")
                _log(f"loading {model} + {visual_encoder} + the trained weights of {ckpt} on {device}…")
                kind, cfg, lm = _load_llava_checkpoint(ckpt, model, visual_encoder, device, dtype)
                tokenizer = kind.load_tokenizer(cfg)
                template = get_template(prompt_template or cfg.prompt_template, tokenizer)
                return cls(lm.eval(), kind, tokenizer, template, system=system if system is not None else cfg.system,
                           model_name=model_name or _default_model_name(str(folder), None), device=device)
            meta = read_lmtune_json(resolve_model_path(llava))
            was = meta.get("llava") or {}
            for given, key in ((model, "llm"), (visual_encoder, "vision_tower")):
                if given and was.get(key) and str(given) != str(was[key]):
                    _log(f"note: {llava} was composed from {key} '{was[key]}'; it is used as trained ('{given}' is "
                         "not loaded again)")
            model = llava
        path = resolve_model_path(model)
        if adapter:
            adapter = _resolve_adapter(adapter)
        cfg = validate({"model": adapter or path, "trust_remote_code": trust_remote_code, "quantization": quantization,
                        "prompt_template": "auto"})
        kind = model_kind(cfg)
        if kind.name != "vision_language":
            raise UserError(f"'{model}' does not see images (it is not a vision-language model)",
                            hint="give a LLaVA / vision-language folder, or compose one with --visual-encoder and "
                                 "--llava")
        meta = read_lmtune_json(path if Path(path).is_dir() else None, adapter)
        _log(f"loading {model}" + (f" + adapter {adapter}" if adapter else "") + f" on {device}…")
        tokenizer = kind.load_tokenizer(cfg)
        lm = kind.load(cfg, torch.device(device), dtype=dtype)
        template = get_template(prompt_template or meta.get("prompt_template") or "auto", tokenizer)
        return cls(lm.eval(), kind, tokenizer, template, system=system if system is not None else meta.get("system"),
                   stop_words=meta.get("stop_words") or [], model_name=model_name or _default_model_name(model, adapter),
                   device=device)

    # ---- what the chat CLI, the page and the API use
    @property
    def model_names(self) -> list[str]:
        return [self.model_name]

    def pending(self) -> int:
        return self._jobs.qsize()

    def with_system(self, messages: list[dict], system: str | None = None) -> list[dict]:
        system = system if system is not None else self.system
        if system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": system}, *messages]
        return list(messages)

    def encode(self, messages: list[dict], images: list[str]) -> list[int]:
        """Prompt ids as training builds them: template, tokenizer, image tokens expanded."""
        from lmtune.data.conversation import Conversation, Message
        from lmtune.data.tokenize import _expand_images, _image_messages

        n = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if n != len(images):
            raise UserError(f"the messages have {n} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
        conv = Conversation([Message(m["role"], m["content"]) for m in messages], images=list(images))
        text = self.template.render(_image_messages(conv, self.template, self._image_tokens()),
                                    add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, _, _ = _expand_images(conv, ids, [(0, 0)] * len(ids), self._image_tokens())
        return ids

    def _image_tokens(self):
        if not hasattr(self, "_tokens"):
            self._tokens = self.kind.image_tokens(self.kind.cfg, self.tokenizer)
        return self._tokens

    def stream(self, messages: list[dict], *, images: list[str] | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 512, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None, system: str | None = None,
               model: str | None = None, loop=None) -> Generation:
        images = list(images or [])
        ids = self.encode(self.with_system(messages, system), images)
        if len(ids) >= self.context_window:
            raise ContextTooLong(f"the prompt is {len(ids)} tokens (images included); this model's context window "
                                 f"is {self.context_window}")
        params = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k or 0),
                      max_new_tokens=max(1, min(int(max_new_tokens), self.context_window - len(ids))),
                      repetition_penalty=float(repetition_penalty), seed=seed, stop=list(stop or []), images=images)
        gen = Generation(ids, params, loop=loop)
        gen._on_cancel = lambda: None  # the stopping criterion sees `cancelled`
        self._ensure_worker()
        self._jobs.put(gen)
        return gen

    def stream_prompt(self, prompt: str, **kw) -> Generation:
        raise UserError("this server answers chat requests (/v1/chat/completions) for a vision-language model")

    def generate(self, messages: list[dict], **kw):
        return self.stream(messages, **kw).result()

    # ---- the worker
    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="lmtune-vision", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            gen = self._jobs.get()
            self.scheduler.busy = True
            try:
                if not gen.cancelled.is_set():
                    self._run(gen)
                else:
                    gen.finish_reason = FINISH_STOP
                gen._put("end")
            except Exception as e:  # report to the requester; the worker lives on
                gen._put("error", e)
            finally:
                self.scheduler.busy = False
                gen.done.set()

    def inputs(self, ids: list[int], images: list[str]) -> dict:
        """generate() keyword arguments for a prompt (on the model's device)."""
        import torch

        device = next(self.model.parameters()).device
        batch = {"input_ids": torch.tensor([ids], dtype=torch.long)}
        extra = self.kind.vision_inputs([{"images": images}], {**batch, "generation": True}) if images else {}
        batch.update(extra)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _run(self, gen: Generation) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        p = gen.params
        collector = _TextCollector(gen, self.tokenizer, [*self.stop_words, *p["stop"]])
        sample = p["temperature"] > 0
        config = GenerationConfig(
            max_new_tokens=p["max_new_tokens"], do_sample=sample, temperature=p["temperature"] if sample else None,
            top_p=p["top_p"] if sample and p["top_p"] < 1.0 else None,
            top_k=p["top_k"] if sample and p["top_k"] > 0 else None,
            repetition_penalty=p["repetition_penalty"] if p["repetition_penalty"] != 1.0 else None,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else
            (self.eos_ids[0] if self.eos_ids else 0))

        class Streamer:  # generate() hands over the prompt first, then each new token
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for t in value.reshape(-1).tolist():
                    collector.add(t)

            def end(self):
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = collector.stopped_by_word or gen.cancelled.is_set()
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        inputs = self.inputs(gen.prompt_ids, p["images"])
        with torch.inference_mode():
            if p["seed"] is not None:
                torch.manual_seed(int(p["seed"]))
            self.model.generate(**inputs, generation_config=config, streamer=Streamer(),
                                stopping_criteria=StoppingCriteriaList([Stop()]))
        if not gen.cancelled.is_set():
            collector.end()
        hit_eos = bool(collector.ids) and collector.ids[-1] in self.eos_ids
        stopped = collector.stopped_by_word or hit_eos or gen.cancelled.is_set()
        gen.finish_reason = FINISH_STOP if stopped else FINISH_LENGTH


class _OneAtATime:
    """What the API and the page ask of a scheduler: one request runs at a time here."""

    max_batch = 1
    busy = False

    def running(self) -> int:
        return int(self.busy)
