"""`lmtune serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions,
GET /health. Streaming answers are server-sent events in OpenAI's chunk shape, ending with
`data: [DONE]`. Every error has OpenAI's body: {"error": {"message", "type", "param", "code"}}.

Requests are batched by the engine (continuous batching: up to --max-batch decode together, the
rest wait in a queue); beyond --max-queue requests in flight (running + waiting) a new one gets
429 with Retry-After instead of piling up. With several adapters the request's `model` picks the
base (by its own name) or an adapter (by its NAME); /v1/models lists them all.
"""


import asyncio
import json
import secrets
import sys
import time
import uuid

from lmtune.errors import UserError

# Real requests nest a few levels (messages -> content parts); far deeper bodies are attacks or bugs.
MAX_JSON_DEPTH = 32


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- request validation


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _number(body: dict, key: str, default, lo=None, hi=None, *, integer=False, lo_open=False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", key,
                   "invalid_type")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _bad(f"'{key}' must be in {rng}, got {value}", key, "invalid_value")
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be a boolean, got {json.dumps(value)}", key, "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise _bad("'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")
    return [s for s in stop if s]


def _depth_exceeds(value, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than `limit` (iterative: no recursion to overflow)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def _response_format(body: dict) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _bad("'response_format' must be an object with a 'type'", "response_format", "invalid_type")
    if fmt["type"] != "text":
        raise _bad(f"response_format type {json.dumps(fmt['type'])} is not supported by this server; only "
                   "'text' is (it does not constrain answers to JSON)", "response_format", "unsupported_parameter")


def _sampling(body: dict, default_max_tokens: int) -> dict:
    n = _number(body, "n", 1, 1, integer=True)
    if n != 1:
        raise _bad("only n=1 is supported", "n", "invalid_value")
    if body.get("logprobs") not in (None, False, 0):
        raise _bad("logprobs are not supported", "logprobs", "unsupported_parameter")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # presence/frequency penalties are accepted for client compatibility but have no effect;
    # repetition_penalty (an extension, as in vLLM) is the knob this server offers.
    _number(body, "presence_penalty", 0, -2, 2)
    _number(body, "frequency_penalty", 0, -2, 2)
    return dict(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=_number(body, "top_k", 0, 0, integer=True),
        max_new_tokens=_number(body, key, default_max_tokens, 1, integer=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, lo_open=True),
        seed=_number(body, "seed", None, integer=True),
        stop=_stop(body),
    )


def _image_part(part: dict, where: str, images: list | None, allow_remote: bool) -> str:
    """An image content part -> "<image>\n" in the text, its reference appended to `images`."""
    from lmtune.serve.vision import image_ref

    if images is None:
        raise _bad(f"{where}.content: this model does not see images (only text parts)", f"{where}.content",
                   "invalid_value")
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    try:
        images.append(image_ref(url, allow_remote=allow_remote))
    except UserError as e:
        raise _bad(f"{where}.content: {e.message}" + (f" ({e.hint})" if e.hint else ""), f"{where}.content",
                   "invalid_value") from None
    return "<image>\n"


def _messages(body: dict, images: list | None = None, allow_remote: bool = False) -> list[dict]:
    """The request's messages; `images` (a list, when the model sees images) collects the image
    references of `image_url` parts, each written as "<image>\n" where it stood."""
    if "messages" not in body:
        raise _bad("you must provide 'messages'", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role must be 'system', 'user' or 'assistant', got {json.dumps(role)}",
                       f"{where}.role", "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text, and images for a model that sees them
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    parts.append(_image_part(part, where, images, allow_remote))
                    continue
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content: only text and image_url parts are supported", f"{where}.content",
                               "invalid_value")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": role, "content": content})
    if body.get("tools"):
        raise _bad("tools are not supported by this server", "tools", "unsupported_parameter")
    return out


def _prompt(body: dict) -> str:
    if "prompt" not in body:
        raise _bad("you must provide 'prompt'", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string (one prompt per request)", "prompt", "invalid_type")
    if _bool(body, "echo"):
        raise _bad("echo is not supported", "echo", "unsupported_parameter")
    return prompt


# --------------------------------------------------------------------------- the app


class _Slot:
    """One in-flight request; released exactly once."""

    def __init__(self, state: dict):
        self.state = state
        state["in_flight"] += 1
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state["in_flight"] -= 1


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine, *, api_key: str | None = None, max_queue: int = 512,
               default_max_tokens: int = 512, allow_remote_images: bool = False):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lmtune.serve.engine import ContextTooLong

    app = FastAPI(title="lmtune", docs_url=None, redoc_url=None, openapi_url=None)
    state = {"in_flight": 0}
    created = int(time.time())
    model_id = engine.model_name
    names = engine.model_names

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "lmtune"}
        if name != model_id:
            card["parent"] = model_id  # an adapter on the base (as vLLM reports LoRA modules)
        return card

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), kind, None, None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, exc):
        # The details go to the server's log, not to the client: they are ours, not the user's to act on.
        print(f"[lmtune] request failed: {exc!r}", file=sys.stderr)
        return JSONResponse(APIError(500, "the server failed to answer this request; see its log",
                                     "server_error").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(_bad(str(exc)).body(), status_code=400)

    def check_auth(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                           "invalid_request_error", None, "invalid_api_key")

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        except RecursionError:  # nesting deeper than the parser's stack
            body = too_deep = True
        else:
            too_deep = _depth_exceeds(body, MAX_JSON_DEPTH)
        if too_deep:
            raise _bad(f"the request body nests objects or arrays more than {MAX_JSON_DEPTH} levels deep",
                       None, "invalid_json")
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if model is None:
            raise _bad("you must provide 'model'", "model", "missing_required_parameter")
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        return body

    def check_model(body: dict) -> str:
        if body["model"] not in names:
            served = ", ".join(f"'{n}'" for n in names)
            raise APIError(404, f"the model '{body['model']}' does not exist; this server serves {served}",
                           "invalid_request_error", "model", "model_not_found")
        return body["model"]

    def take_slot() -> _Slot:
        if state["in_flight"] >= max_queue:
            raise APIError(429, f"the server is busy ({state['in_flight']} requests in flight, the queue limit is "
                                f"{max_queue}); retry shortly", "rate_limit_error", None,
                           "rate_limit_exceeded", headers={"Retry-After": "1"})
        return _Slot(state)

    def start(slot: _Slot, make):
        try:
            return make()
        except ContextTooLong as e:
            slot.release()
            raise _bad(str(e), "messages", "context_length_exceeded") from None
        except UserError as e:  # e.g. an image that cannot be read, or placeholders without images
            slot.release()
            raise _bad(str(e), "messages", "invalid_value") from None
        except BaseException:
            slot.release()
            raise

    def usage(gen) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "models": names, "in_flight": state["in_flight"],
                "running": engine.scheduler.running(), "waiting": engine.pending()}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_auth(request)
        if name not in names:
            raise APIError(404, f"the model '{name}' does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return model_card(name)

    async def complete(request: Request, chat: bool):
        check_auth(request)
        body = await read_json(request)
        stream = _bool(body, "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = _bool(stream_options, "include_usage")
        images = [] if getattr(engine, "sees_images", False) else None
        if chat:
            messages = _messages(body, images, allow_remote_images)
            _response_format(body)
            params = _sampling(body, default_max_tokens)
        else:
            prompt = _prompt(body)
            params = _sampling(body, 16)  # OpenAI's default for /v1/completions
        model = check_model(body)
        slot = take_slot()
        loop = asyncio.get_running_loop()
        if images:
            params["images"] = images
        gen = start(slot, lambda: engine.stream(messages, model=model, loop=loop, **params) if chat
                    else engine.stream_prompt(prompt, model=model, loop=loop, **params))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        if not stream:
            try:
                text = "".join([piece async for piece in gen])
            finally:
                gen.cancel()
                slot.release()
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "logprobs": None, "finish_reason": gen.finish_reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                    "model": model, "choices": [choice], "usage": usage(gen)}

        def chunk(delta_or_text, finish=None) -> dict:
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
            c = {"id": rid, "object": obj, "created": now, "model": model, "choices": [choice]}
            if include_usage:
                c["usage"] = None
            return c

        async def events():
            try:
                if chat:
                    yield _sse(chunk({"role": "assistant", "content": ""}))
                async for piece in gen:
                    yield _sse(chunk({"content": piece} if chat else piece))
                yield _sse(chunk({} if chat else "", gen.finish_reason))
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": now, "model": model, "choices": [],
                                "usage": usage(gen)})
                yield "data: [DONE]\n\n"
            except Exception as e:  # headers are sent already: report in-band, OpenAI-style
                print(f"[lmtune] generation failed: {e!r}", file=sys.stderr)
                yield _sse(APIError(500, f"generation failed: {e}", "server_error").body())
            finally:
                gen.cancel()  # the client went away, or we are done: free the worker either way
                slot.release()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(slot.release))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def serve_command(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("`lmtune serve` needs fastapi and uvicorn", hint="pip install 'lmtune[serve]'") from None
    from lmtune.serve.chat import engine_from_args

    if args.max_queue < 1:
        raise UserError("--max-queue must be >= 1")
    engine = engine_from_args(args)
    app = create_app(engine, api_key=args.api_key, max_queue=args.max_queue,
                     default_max_tokens=getattr(args, "max_tokens_default", 512),
                     allow_remote_images=getattr(args, "allow_remote_images", False))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"[lmtune] warning: serving on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    served = ", ".join(f"'{n}'" for n in engine.model_names)
    print(f"[lmtune] serving {served} at http://{args.host}:{args.port}/v1 "
          f"(OpenAI-compatible; batches up to {engine.scheduler.max_batch}; Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
