"""Continuous batching: the requests in flight share every forward pass of the model.

One worker thread owns the model. It keeps a *running batch*: one row per request being answered,
with the rows' key/value caches stacked into one transformers `DynamicCache` of shape
[rows, kv_heads, length, head_dim], left-padded so that every row's newest token sits in the last
column. Each turn of the loop:

1. drops the rows whose client went away (cancelled) or that finished, at once;
2. admits waiting requests (up to `max_batch` rows, a per-turn prefill budget, and the KV-cache
   memory budget): each is *prefilled alone* (batch of one, exactly as if it were the only
   request) and its cache is left-padded into the running batch. The head of the prompt that
   requests share (system prompt, earlier turns, the turn header) is computed once per adapter
   and its cache reused; it is always computed separately, cached or not, so an answer does not
   depend on what ran before;
3. runs one decode step for all rows together: each row's last token, its own position id, and
   an attention mask that hides the padding; then picks each row's next token with the row's own
   sampling settings and random generator.

Padding is masked out, so a row's logits are the same numbers as when it runs alone, up to the
float rounding of a matrix product with more rows; greedy answers therefore equal the solo ones
(the tests and bench/serve_load.py check this).

Why not transformers' own continuous batching (`model.init_continuous_batching`, paged cache)?
In transformers 5.x it takes one sampling configuration and one seed for the whole manager (no
per-request seed or greedy/sampled mix), it flattens every request into one varlen row, which
peft's per-request adapter mixing (`adapter_names`, one name per batch row) cannot address, and
it is built around CUDA graphs and flash/paged attention kernels. This loop uses only the model's
ordinary forward, so it runs the same on CPU and GPU and with peft adapters.

Several adapters: with `mixed=True` rows of different adapters share a step (peft's
`adapter_names`); otherwise one adapter runs at a time and adapters take turns (fair queueing).
"""

from __future__ import annotations

import atexit
import collections
import functools
import inspect
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
MIN_PREFIX = 8  # shorter shared prompt heads are not worth a cache entry
MAX_PREFIXES = 32  # shared prompt heads kept (least recently used dropped)


@dataclass
class Request:
    """A request waiting for, or holding, a row in the batch."""

    gen: object  # engine.Generation
    prompt_ids: list[int]
    adapter: str | None  # peft adapter name, BASE, or None (the model as loaded)
    eos_ids: frozenset
    collector: object  # engine._TextCollector
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    prefix_len: int = 0  # leading prompt tokens others may share (system prompt, history): cached KV
    arrival: float = field(default_factory=time.monotonic)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.repetition_penalty == 1.0


class _Row:
    def __init__(self, req: Request, device):
        self.req = req
        self.tokens = list(req.prompt_ids)  # prompt + generated, for the repetition penalty
        self.generated = 0
        self.next_token: int | None = None
        self.generator = None
        if req.temperature > 0:
            # Each request draws from its own generator: a seed makes this request repeatable and
            # leaves every other request (and the process's global RNG) alone.
            self.generator = torch.Generator(device=device)
            if req.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(req.seed))


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


class Scheduler:
    """Owns the model's forward passes; `submit` requests, the worker streams their tokens."""

    def __init__(self, model, *, max_batch: int = 64, kv_budget_bytes: int | None = None,
                 prefill_tokens: int = 512, mixed: bool = True, adapter_names: bool = False,
                 on_token=None, on_finish=None, on_error=None):
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.mixed = mixed
        self.adapter_names = adapter_names  # pass peft's adapter_names (several adapters loaded)
        self.on_token, self.on_finish, self.on_error = on_token, on_finish, on_error
        self.device = _model_device(model)
        self.kv_bytes_per_token = _kv_bytes_per_token(model)
        self.kv_budget_bytes = kv_budget_bytes
        self._keeps_logits = "logits_to_keep" in inspect.signature(_inner_forward(model)).parameters
        self._cv = threading.Condition()
        self._waiting: dict[object, collections.deque[Request]] = collections.OrderedDict()
        self._turn: list = []  # adapter keys in round-robin order
        self._worker: threading.Thread | None = None
        self._closing = False
        # the running batch (touched by the worker only)
        self.rows: list[_Row] = []
        self._cache = None  # DynamicCache, [rows, heads, length, dim]
        self._mask = None  # [rows, length] long: 1 = a real token, 0 = left padding
        self._active_adapter = None  # the one adapter running when not mixed
        self._prefixes: collections.OrderedDict = collections.OrderedDict()  # shared prompt heads' KV, LRU
        self.prefix_hits = 0
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_rows_seen = 0

    # ------------------------------------------------------------------ from any thread
    def submit(self, req: Request) -> None:
        key = req.adapter
        with self._cv:
            if key not in self._waiting:
                self._waiting[key] = collections.deque()
                self._turn.append(key)
            self._waiting[key].append(req)
            self._ensure_worker()
            self._cv.notify()

    def waiting(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._waiting.values())

    def running(self) -> int:
        return len(self.rows)

    def wake(self) -> None:
        """Make the worker look at cancellations now (it otherwise notices at its next step)."""
        with self._cv:
            self._cv.notify()

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._closing = False
            self._worker = threading.Thread(target=self._loop, name="lmtune-batch", daemon=True)
            self._worker.start()
            # A daemon thread still inside a torch op when the interpreter exits aborts the process
            # ("terminate called without an active exception"): stop it first.
            atexit.register(self.close)

    def close(self, timeout: float = 30) -> None:
        """Stop the worker after its current step (requests still in flight end as cancelled).
        The exit hook lets go of the scheduler too, so a closed engine's model can be freed."""
        atexit.unregister(self.close)
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.rows and not any(self._waiting.values()) and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
            try:
                with torch.inference_mode():
                    self._drop_done()
                    self._admit()
                    if self.rows:
                        self._decode_step()
            except Exception as e:  # a failed batch step: fail its requests, keep serving
                _log(f"generation step failed: {e!r}")
                for row in self.rows:
                    self.on_error(row.req, e)
                self._reset_batch()

    def _reset_batch(self) -> None:
        self.rows, self._cache, self._mask = [], None, None

    def _drop_done(self) -> None:
        keep = []
        for i, row in enumerate(self.rows):
            if row.next_token is None:  # finished in the last step (and already told so)
                continue
            if row.req.gen.cancelled.is_set():  # the client went away: free the row now
                self.on_finish(row.req, "stop")
                continue
            keep.append(i)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset_batch()
            return
        self.rows = [self.rows[i] for i in keep]
        idx = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(idx)
        self._mask = self._mask[idx]
        # Columns that are padding in every remaining row are dead weight: cut them off.
        first = int(self._mask.any(0).to(torch.int8).argmax())
        if first >= 16 and first * 4 >= self._mask.shape[1]:
            self._cache = _cache_from([(k[:, :, first:], v[:, :, first:]) for k, v in _layers(self._cache)])
            self._mask = self._mask[:, first:]

    # ---- admission
    def _next_request(self, busy: bool) -> Request | None:
        """The next waiting request to admit, taking adapters in turn (fair queueing).
        `busy`: the batch has rows (running or joining this turn)."""
        with self._cv:
            for _ in range(len(self._turn)):
                key = self._turn[0]
                self._turn.append(self._turn.pop(0))
                q = self._waiting.get(key)
                if not q:
                    continue
                if not self.mixed and busy and key != self._active_adapter:
                    continue  # one adapter at a time: this one waits for the batch to drain
                if not self.mixed and busy and self._others_waiting(key):
                    return None  # let the batch drain so the waiting adapters get their turn
                return q[0]
            return None

    def _others_waiting(self, key) -> bool:
        return any(q for k, q in self._waiting.items() if k != key)

    def _pop(self, req: Request) -> None:
        with self._cv:
            self._waiting[req.adapter].remove(req)

    def _fits(self, req: Request, joining: list) -> bool:
        """Whether the KV cache of the batch with `req` added stays inside the memory budget
        (worst case: every row padded to the longest prompt + answer, and one copy in flight)."""
        if self.kv_budget_bytes is None or (not self.rows and not joining):
            return True  # a lone request always runs
        now = self._mask.shape[1] if self._mask is not None else 0
        longest = max([now + r.req.max_new_tokens - r.generated for r in self.rows]
                      + [len(j.req.prompt_ids) + j.req.max_new_tokens for j in joining]
                      + [len(req.prompt_ids) + req.max_new_tokens])
        rows = len(self.rows) + len(joining) + 1
        return 2 * rows * longest * self.kv_bytes_per_token <= self.kv_budget_bytes

    def _admit(self) -> None:
        joining: list[tuple[_Row, list]] = []
        budget = self.prefill_tokens
        while len(self.rows) + len(joining) < self.max_batch and budget > 0:
            req = self._next_request(bool(self.rows or joining))
            if req is None:
                break
            if req.gen.cancelled.is_set():
                self._pop(req)
                self.on_finish(req, "stop")
                continue
            if not self._fits(req, [j[0] for j in joining]):
                break
            self._pop(req)
            budget -= len(req.prompt_ids)
            row = _Row(req, self.device)
            try:
                kv = self._prefill(row)
            except Exception as e:  # this request alone failed (e.g. out of memory): tell it, go on
                _log(f"prefill failed: {e!r}")
                self.on_error(req, e)
                continue
            if row.next_token is not None:
                joining.append((row, kv))
        if joining:
            self._join(joining)

    def _forward(self, input_ids, adapters: list, **kw):
        if self.device.type == "cuda":
            # cuDNN's attention builds a plan per new key length: with every decode step one token
            # longer that cost ~5 ms per layer per step on an H100 (measured). The other kernels
            # take any length.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return self._forward_any(input_ids, adapters, **kw)
        return self._forward_any(input_ids, adapters, **kw)

    def _forward_any(self, input_ids, adapters: list, **kw):
        if self._keeps_logits:
            kw["logits_to_keep"] = 1
        if self.adapter_names and self.mixed:
            kw["adapter_names"] = adapters
        elif self.adapter_names:  # one adapter at a time
            key = adapters[0]
            if key == BASE:
                with self.model.disable_adapter():
                    return self.model(input_ids=input_ids, use_cache=True, **kw)
            if self.model.active_adapter != key:
                self.model.set_adapter(key)
        return self.model(input_ids=input_ids, use_cache=True, **kw)

    def _prefill(self, row: _Row):
        from transformers import DynamicCache

        req = row.req
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        n = req.prefix_len
        if MIN_PREFIX <= n < len(req.prompt_ids):
            # The shared head of the prompt is always computed on its own (cached or not), so a
            # request's numbers do not depend on whether another request came first.
            cache = DynamicCache(ddp_cache_data=self._prefix_kv(req.adapter, ids[:, :n]))
            out = self._forward(ids[:, n:], [req.adapter], past_key_values=cache)
        else:
            cache = DynamicCache()
            out = self._forward(ids, [req.adapter], past_key_values=cache)
        if not self.mixed:
            self._active_adapter = req.adapter
        self._emit([row], out.logits[:, -1, :])
        return [(k, v) for k, v in _layers(cache)] if row.next_token is not None else None

    def _prefix_kv(self, adapter, ids) -> list:
        """The KV cache of a shared prompt head, computed once per (adapter, tokens)."""
        from transformers import DynamicCache

        key = (adapter, tuple(ids[0].tolist()))
        kv = self._prefixes.get(key)
        if kv is None:
            cache = DynamicCache()
            self._forward(ids, [adapter], past_key_values=cache)
            kv = list(_layers(cache))
            self._prefixes[key] = kv
            while len(self._prefixes) > MAX_PREFIXES:
                self._prefixes.popitem(last=False)
        else:
            self._prefixes.move_to_end(key)
            self.prefix_hits += 1
        return kv

    def _join(self, joining: list) -> None:
        """Left-pad the new rows' caches and the running batch's to one length and stack them."""
        old = list(_layers(self._cache)) if self._cache is not None else None
        old_len = self._mask.shape[1] if self._mask is not None else 0
        length = max([old_len] + [kv[0][0].shape[2] for _, kv in joining])
        layers = []
        for li in range(len(joining[0][1])):
            ks, vs = [], []
            if old is not None:
                ks.append(_left_pad(old[li][0], length))
                vs.append(_left_pad(old[li][1], length))
            for _, kv in joining:
                ks.append(_left_pad(kv[li][0], length))
                vs.append(_left_pad(kv[li][1], length))
            layers.append((torch.cat(ks), torch.cat(vs)))
        masks = [] if self._mask is None else [_left_pad_mask(self._mask, length)]
        for _, kv in joining:
            n = kv[0][0].shape[2]
            masks.append(_left_pad_mask(torch.ones(1, n, dtype=torch.long, device=self.device), length))
        self._cache = _cache_from(layers)
        self._mask = torch.cat(masks)
        self.rows += [row for row, _ in joining]
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))

    # ---- decoding
    def _decode_step(self) -> None:
        rows = self.rows
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], 1)
        # position = how many real tokens precede the new one in this row
        positions = (mask.sum(1, keepdim=True) - 1)
        out = self._forward(ids, [r.req.adapter for r in rows], attention_mask=mask, position_ids=positions,
                            past_key_values=self._cache)
        self._mask = mask
        self.steps += 1
        self._emit(rows, out.logits[:, -1, :])

    def _emit(self, rows: list[_Row], logits) -> None:
        """Pick each row's next token from its logits, hand it to its request, mark finished rows."""
        logits = logits.float()
        chosen = [None] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.req.greedy]
        if greedy:
            picks = logits[greedy].argmax(-1).tolist()
            for i, t in zip(greedy, picks):
                chosen[i] = t
        for i, r in enumerate(rows):
            if chosen[i] is None:
                chosen[i] = _sample(logits[i], r)
        for r, token in zip(rows, chosen):
            r.tokens.append(token)
            r.generated += 1
            self.on_token(r.req, token)
            req = r.req
            if token in req.eos_ids or req.collector.stopped_by_word or req.gen.cancelled.is_set():
                r.next_token = None
                self.on_finish(req, "stop")
            elif r.generated >= req.max_new_tokens:
                r.next_token = None
                self.on_finish(req, "length")
            else:
                r.next_token = token


def _sample(logits, row: _Row) -> int:
    """One row's next token, processed in the order transformers' generate() uses:
    repetition penalty, temperature, top-k, top-p."""
    req = row.req
    if req.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.tokens)), dtype=torch.long, device=logits.device)
        score = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(score < 0, score * req.repetition_penalty, score / req.repetition_penalty)
    if req.temperature <= 0:
        return int(logits.argmax())
    logits = logits / req.temperature
    if req.top_k > 0 and req.top_k < logits.shape[-1]:
        kth = torch.topk(logits, req.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if req.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - req.top_p)
        drop[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=row.generator))


# ---------------------------------------------------------------------- cache helpers


def _layers(cache):
    for layer in cache.layers:
        yield layer.keys, layer.values


def _cache_from(layers):
    """The batch's cache: one `_GrowingLayer` per model layer, holding the given keys/values."""
    from transformers.cache_utils import Cache

    return Cache(layers=[_growing_layer(k, v) for k, v in layers])


def _growing_layer(keys, values):
    return _growing_layer_class()(keys, values)


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _GrowingLayer(DynamicLayer):
        """A DynamicLayer whose keys/values sit in a buffer with spare columns, so a decode step
        writes its new column in place; DynamicLayer's torch.cat would copy the whole batch's
        cache every step (for a large batch, most of a step's memory traffic)."""

        def __init__(self, k, v):
            super().__init__()
            self.lazy_initialization(k, v)
            self._k, self._v, self._n = k, v, k.shape[2]
            self._grow(0)

        def _grow(self, extra: int) -> None:
            need = self._n + extra
            if need <= self._k.shape[2] and self._k.shape[2] > self._n:
                return
            cap = need + max(64, need // 2)
            k = self._k.new_empty(self._k.shape[0], self._k.shape[1], cap, self._k.shape[3])
            v = self._v.new_empty(self._v.shape[0], self._v.shape[1], cap, self._v.shape[3])
            k[:, :, : self._n] = self._k[:, :, : self._n]
            v[:, :, : self._n] = self._v[:, :, : self._n]
            self._k, self._v = k, v
            self._views()

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            add = key_states.shape[2]
            self._grow(add)
            self._k[:, :, self._n: self._n + add] = key_states
            self._v[:, :, self._n: self._n + add] = value_states
            self._n += add
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    return _GrowingLayer


def _left_pad(t, length: int):
    n = t.shape[2]
    if n == length:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], length - n, t.shape[3])
    return torch.cat([pad, t], dim=2)


def _left_pad_mask(m, length: int):
    n = m.shape[1]
    if n == length:
        return m
    return torch.cat([m.new_zeros(m.shape[0], length - n), m], dim=1)


def _inner_forward(model):
    """The transformers model's own forward (under peft's wrapper, if any)."""
    base = model
    while hasattr(base, "base_model") and base.base_model is not base and hasattr(base, "peft_config"):
        base = base.base_model
    if hasattr(base, "model") and hasattr(base, "peft_config"):  # peft's LoraModel
        base = base.model
    return base.forward


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _kv_bytes_per_token(model) -> int:
    """Bytes of key + value cache one token takes across all layers."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", 1)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
    return 2 * layers * heads * head_dim * size
