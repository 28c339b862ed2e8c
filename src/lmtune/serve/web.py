"""`lmtune web`: a Gradio chat page with streamed answers.

Multi-turn history, a system-prompt box, temperature / top-p / max-new-tokens sliders, Stop and
Clear buttons; an image box when the model sees images. Binds 127.0.0.1 unless --host says
otherwise; no analytics, no external fonts, no share links, so it starts and works offline.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

from lmtune.errors import UserError

# A local font stack: the default theme would ask Google Fonts, which offline machines cannot reach.
_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise UserError("`lmtune web` needs gradio", hint="pip install 'lmtune[serve]'  (or: pip install gradio)") from None
    return gr


def _text(content) -> str:
    """A chatbot message's content (a string or Gradio's list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def to_messages(chat: list) -> list[dict]:
    return [{"role": m["role"], "content": _text(m["content"])} for m in chat or []
            if m.get("role") in ("user", "assistant")]


@dataclass
class ChatPanel:
    """The components of a chat panel, for pages that update them (e.g. after loading a model)."""

    chatbot: object
    box: object
    system: object
    temperature: object
    top_p: object
    max_new: object
    image: object = None  # the image box (a model that sees images)


def max_new_tokens_limit(engine) -> int:
    return max(16, min(4096, engine.context_window // 2))


def chat_panel(get_engine, *, system: str = "", max_ctx: int = 2048, no_engine: str = "No model is loaded.",
               autofocus: bool = True, images: bool = False) -> ChatPanel:
    """A streaming chat (conversation, input, Send / Stop / Clear, settings) inside the current
    gr.Blocks. `get_engine()` gives the engine each answer uses (None: `no_engine` is shown), so
    a page can load another model without rebuilding itself. `images`: an image box whose image
    goes with the next message (a model that sees images)."""
    gr = _import_gradio()
    chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="lmtune-chat", buttons=["copy"])
    image = gr.Image(type="filepath", label="Image (sent with your next message)", height=180,
                     elem_id="lmtune-image", visible=images)
    seen_images = gr.State([])  # every image of the conversation, in order
    with gr.Row():
        box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=7,
                         elem_id="lmtune-input", autofocus=autofocus)
        send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="lmtune-send")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, elem_id="lmtune-stop")
        clear = gr.Button("Clear", scale=1, min_width=90, elem_id="lmtune-clear")
    with gr.Accordion("Settings", open=False):
        system_box = gr.Textbox(value=system or "", label="System prompt (empty: the template's default)",
                                lines=2, elem_id="lmtune-system")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)",
                                    elem_id="lmtune-temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
            max_new = gr.Slider(16, max_ctx, value=min(512, max_ctx), step=16, label="Max new tokens")

    def add_user(message: str, chat: list, picture, seen: list):
        message = (message or "").strip()
        if not message:
            return "", chat, picture, seen
        if picture:
            return "", [*(chat or []), {"role": "user", "content": "<image>\n" + message}], None, [*seen, picture]
        return "", [*(chat or []), {"role": "user", "content": message}], None, seen

    async def respond(chat: list, seen: list, system_prompt: str, temp: float, p: float, n: int):
        from lmtune.serve.engine import ContextTooLong

        messages = to_messages(chat)
        if not messages or messages[-1]["role"] != "user":
            yield chat
            return
        chat = [*chat, {"role": "assistant", "content": ""}]
        engine = get_engine()
        if engine is None:
            chat[-1]["content"] = f"⚠️ {no_engine}"
            yield chat
            return
        try:
            gen = engine.stream(messages, system=system_prompt or "", temperature=float(temp), top_p=float(p),
                                max_new_tokens=int(n), loop=asyncio.get_running_loop(),
                                **({"images": list(seen)} if seen else {}))
        except (ContextTooLong, UserError) as e:
            chat[-1]["content"] = f"⚠️ {e}. Press Clear to start over."
            yield chat
            return
        text = ""
        async for piece in gen:  # Stop cancels this task; the engine then stops generating
            text += piece
            chat[-1] = {"role": "assistant", "content": text}
            yield chat

    inputs = [chatbot, seen_images, system_box, temperature, top_p, max_new]
    turn = [box, chatbot, image, seen_images]
    on_enter = box.submit(add_user, turn, turn, queue=False).then(respond, inputs, chatbot)
    on_send = send.click(add_user, turn, turn, queue=False).then(respond, inputs, chatbot)
    stop.click(None, None, None, cancels=[on_enter, on_send])
    clear.click(lambda: ("", [], None, []), None, turn, cancels=[on_enter, on_send], queue=False)
    return ChatPanel(chatbot, box, system_box, temperature, top_p, max_new, image)


def build_demo(engine, title: str | None = None):
    """The chat page for `engine` (a gr.Blocks; call .launch())."""
    gr = _import_gradio()
    title = title or f"lmtune · {engine.model_name}"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        chat_panel(lambda: engine, system=engine.system or "", max_ctx=max_new_tokens_limit(engine),
                   images=getattr(engine, "sees_images", False))
    return demo


def theme():
    gr = _import_gradio()
    return gr.themes.Default(font=_FONTS, font_mono=_MONO)


def web_command(args) -> int:
    _import_gradio()  # a clear message before the slow model load when gradio is missing
    from lmtune.serve.chat import engine_from_args

    engine = engine_from_args(args)
    demo = build_demo(engine, title=args.title)
    # Every open page streams at once: the engine batches them (up to --max-batch), so the page's
    # queue need not hold anyone back.
    demo.queue(default_concurrency_limit=max(16, engine.scheduler.max_batch))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[lmtune] warning: the page is reachable by anyone who can reach {args.host}:{args.port}",
              file=sys.stderr)
    print(f"[lmtune] chat page for '{engine.model_name}' at http://{args.host}:{args.port} (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True,
                    ssr_mode=False, quiet=True, footer_links=[], theme=theme())
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e}", hint="pick another --port") from None
    return 0

