"""`lmtune chat`: talk to a model in the terminal, answers streamed as they are generated.

Interactive: type a message; `/reset` (or RESET) forgets the conversation, `/exit` (or EXIT, or
Ctrl-D) quits, Ctrl-C stops the current answer. `--prompt TEXT` answers once and exits. When
stdin is not a terminal, each input line is one user turn and only the answers are printed.
"""

from __future__ import annotations

import sys

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


def engine_from_args(args):
    from lmtune.serve.engine import Engine

    return Engine.load(
        args.model, adapter=args.adapter, prompt_template=args.prompt_template, system=args.system,
        bits=args.bits, device=args.device, trust_remote_code=args.trust_remote_code,
        model_name=getattr(args, "model_name", None),
    )


def answer(engine, history: list[dict], kw: dict, out=sys.stdout) -> str:
    """Stream one answer to `out`; returns its text. Ctrl-C stops it early (kept in history)."""
    from lmtune.serve.engine import ContextTooLong

    try:
        gen = engine.stream(history, **kw)
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


def chat_command(args) -> int:
    kw = sampling_kwargs(args)
    engine = engine_from_args(args)
    if args.prompt is not None:
        answer(engine, [{"role": "user", "content": args.prompt}], kw)
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
            history = []
            if interactive:
                print("[conversation reset]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply = answer(engine, history, kw)
        history.append({"role": "assistant", "content": reply})
    return 0
