"""`lmtune chat`: talk to a model in the terminal, answers streamed as they are generated.

Interactive: type a message; `/reset` (or RESET) forgets the conversation, `/exit` (or EXIT, or
Ctrl-D) quits, Ctrl-C stops the current answer. A model that sees images takes `--image IMG`
(with the first message) and `/image PATH` (with the next one). `--prompt TEXT` answers once and exits. When
stdin is not a terminal, each input line is one user turn and only the answers are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmtune.errors import UserError

RESET_WORDS = ("/reset", "reset", "/clear")
EXIT_WORDS = ("/exit", "exit", "/quit", "quit")


def sampling_kwargs(args) -> dict:
    kw = dict(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    if kw["temperature"] < 0:
        raise UserError("--temperature must be >= 0 (0 = greedy)")
    if not 0 < kw["top_p"] <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if kw["max_new_tokens"] < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if kw["repetition_penalty"] <= 0:
        raise UserError("--repetition-penalty must be > 0")
    return kw


def parse_adapters(values) -> tuple[str | None, dict[str, str]]:
    """`--adapter` values -> (one unnamed adapter, {name: folder}).

    A lone `--adapter DIR` keeps its old meaning (the adapter is served under the model's name);
    `NAME=DIR` (repeatable) serves each adapter under NAME next to the base."""
    if values is None:
        return None, {}
    if isinstance(values, str):
        values = [values]
    named: dict[str, str] = {}
    unnamed: list[str] = []
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or Path(v).exists():  # a folder whose name holds '=' is still a folder
            unnamed.append(v)
            continue
        if not name or not folder:
            raise UserError(f"--adapter {v!r}: expected NAME=DIR or DIR")
        if name in named:
            raise UserError(f"--adapter: the name '{name}' is given twice")
        named[name] = folder
    if len(unnamed) == 1 and not named:
        return unnamed[0], {}
    for folder in unnamed:  # among named ones, an unnamed adapter is named after its folder
        from lmtune.serve.engine import _default_model_name

        name = _default_model_name(folder, folder)
        if name in named:
            raise UserError(f"--adapter {folder}: its folder name '{name}' is already an adapter name",
                            hint="name it: --adapter NAME=DIR")
        named[name] = folder
    return None, named


def engine_from_args(args):
    from lmtune.serve.engine import Engine

    adapter, adapters = parse_adapters(args.adapter)
    llava, encoder = getattr(args, "llava", None), getattr(args, "visual_encoder", None)
    if getattr(args, "image", None) or llava or encoder or _sees_images(args.model):
        from lmtune.serve.vision import VisionEngine

        if adapters:
            raise UserError("named adapters (NAME=DIR) are served for text models only", hint="give one --adapter DIR")
        return VisionEngine.load(args.model, adapter=adapter, prompt_template=args.prompt_template, system=args.system,
                                 bits=args.bits, device=args.device, trust_remote_code=args.trust_remote_code,
                                 model_name=getattr(args, "model_name", None), llava=llava, visual_encoder=encoder)
    max_batch = getattr(args, "max_batch", None)
    if max_batch is not None and max_batch < 1:
        raise UserError("--max-batch must be >= 1")
    kv_memory = getattr(args, "kv_memory", None)
    if kv_memory is not None and kv_memory <= 0:
        raise UserError("--kv-memory must be > 0 (GB)")
    return Engine.load(
        args.model, adapter=adapter, adapters=adapters, prompt_template=args.prompt_template, system=args.system,
        bits=args.bits, device=args.device, trust_remote_code=args.trust_remote_code,
        model_name=getattr(args, "model_name", None), max_batch=max_batch, kv_memory_gb=kv_memory,
    )


def _sees_images(model: str) -> bool:
    from lmtune.serve.vision import sees_images

    return sees_images(model)


def user_turn(text: str, images: list[str]) -> dict:
    """A user message with an `<image>` line for each image attached to it."""
    return {"role": "user", "content": "<image>\n" * len(images) + text}


def answer(engine, history: list[dict], kw: dict, out=None, images: list[str] | None = None) -> str:
    """Stream one answer to `out` (stdout); returns its text. Ctrl-C stops it early (kept in history).
    `images`: every image of the conversation so far, in order (a model that sees images)."""
    from lmtune.serve.engine import ContextTooLong

    out = out or sys.stdout

    try:
        gen = engine.stream(history, **kw, **({"images": images} if images else {}))
    except ContextTooLong as e:
        print(f"[{e}; /reset to start over]", file=sys.stderr)
        return ""
    try:
        for piece in gen:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        gen.cancel()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return gen.text


def _image_path(path: str) -> str:
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"image '{path}' does not exist")
    return str(p)


def chat_command(args) -> int:
    kw = sampling_kwargs(args)
    engine = engine_from_args(args)
    attached = [_image_path(p) for p in getattr(args, "image", None) or []]  # go with the next message
    images: list[str] = []
    if args.prompt is not None:
        answer(engine, [user_turn(args.prompt, attached)], kw, images=attached)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"chatting with {engine.model_name} — /reset forgets the conversation, /exit quits",
              file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        if not interactive and line == "":  # EOF on a pipe
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            break
        if text.lower() in RESET_WORDS:
            history, images = [], []
            if interactive:
                print("[conversation reset]", file=sys.stderr)
            continue
        if text.startswith("/image "):  # attach an image to the next message
            try:
                attached.append(_image_path(text[len("/image "):].strip()))
            except UserError as e:
                print(f"[{e}]", file=sys.stderr)
            continue
        history.append(user_turn(text, attached))
        images, attached = images + attached, []
        reply = answer(engine, history, kw, images=images)
        history.append({"role": "assistant", "content": reply})
    return 0
