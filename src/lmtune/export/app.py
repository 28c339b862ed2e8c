"""`lmtune export app`: a self-contained folder that runs a chat page with `python app.py`.

OUT_DIR/
  model/              the model (LoRA merged in), safetensors, sharded; tokenizer; generation config
  app.py              a standalone Gradio chat page (no lmtune import): loads ./model on GPU or CPU
  app_config.json     title, default system prompt, stop words
  requirements.txt    torch, transformers, gradio, safetensors, accelerate (version ranges)
  README.md           how to run it
  lmtune-app.json     marks the folder as an lmtune export and lists its files (so a re-export may
                      replace it, unless files were added to it)

The folder is built next to OUT_DIR and renamed into place, so OUT_DIR is never half-written; a
folder that is not a previous export is replaced only with `overwrite` (lmtune.atomic's rule).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lmtune.atomic import APP_MARKER, atomic_dir, check_not_input, check_out_dir
from lmtune.errors import UserError
from lmtune.export.hf import save_tokenizer

MARKER = APP_MARKER


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


def _requirements() -> str:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    # transformers writes config files for its own major version; older majors may misread them.
    return "\n".join([
        "torch>=2.4",
        f"transformers>={major}.0,<{major + 1}",
        "gradio>=6,<7",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "",
    ])


def export_app(model: str, out_dir: str, adapter: str | None = None, title: str | None = None,
               max_shard_size: str = "2GB", overwrite: bool = False) -> Path:
    from lmtune.models.loader import load_model, load_tokenizer, resolve_model_path
    from lmtune.serve.engine import _default_model_name, _resolve_adapter, read_lmtune_json

    out = Path(out_dir).expanduser().resolve()
    check_not_input(out, model=Path(model).expanduser(), adapter=adapter and Path(adapter).expanduser())
    check_out_dir(out, marker=MARKER, overwrite=overwrite)  # before any slow work
    path = resolve_model_path(model)
    if adapter:
        adapter = _resolve_adapter(adapter)
    meta = read_lmtune_json(path if Path(path).is_dir() else None, adapter)
    name = _default_model_name(model, adapter)
    title = title or name

    t0 = time.time()
    _log(f"loading {model}" + (f" + adapter {adapter}" if adapter else "") + "…")
    # dtype "auto": the model's own (a float32 model stays float32); loaded on CPU.
    lm = load_model(path, dtype="auto", adapter=adapter)
    if getattr(lm, "peft_config", None):  # an adapter (given, or MODEL was an adapter folder)
        _log("merging the LoRA adapter into the base weights…")
        lm = lm.merge_and_unload()
    if getattr(lm, "hf_quantizer", None) is not None:
        raise UserError("cannot export a quantized model as an app", hint="export the full-precision model")
    tok_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path
    tokenizer = load_tokenizer(tok_source)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template, so the app cannot format conversations",
                        hint="export a model trained by lmtune (it saves its chat template with the tokenizer)")

    with atomic_dir(out, marker=MARKER, overwrite=overwrite) as tmp:
        model_dir = tmp / "model"
        lm.save_pretrained(model_dir, safe_serialization=True, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, model_dir)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(model_dir)
        app_config = {
            "title": title,
            "system": meta.get("system"),
            "stop_words": meta.get("stop_words") or [],
        }
        (tmp / "app_config.json").write_text(json.dumps(app_config, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        (tmp / "app.py").write_text(APP_PY, encoding="utf-8")
        (tmp / "requirements.txt").write_text(_requirements(), encoding="utf-8")
        (tmp / "README.md").write_text(README.format(title=title), encoding="utf-8")
        from lmtune import __version__

        (tmp / MARKER).write_text(json.dumps({
            "lmtune_version": __version__, "model": str(model), "adapter": adapter,
            "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=2) + "\n", encoding="utf-8")
    _log(f"exported to {out} ({time.time() - t0:.0f} s). Run it: cd {out} && pip install -r requirements.txt "
         "&& python app.py")
    return out


README = """# {title}

A chat app exported by `lmtune export app`. Everything it needs is in this folder.

```bash
python -m venv .venv && . .venv/bin/activate
pip install -r requirements.txt      # for a CPU-only machine, install torch first:
                                     # pip install torch --index-url https://download.pytorch.org/whl/cpu
python app.py                        # then open http://127.0.0.1:7860
```

Options: `python app.py --host 0.0.0.0 --port 8080` (reachable from other machines),
`--max-new-tokens 1024`. It runs on the GPU when one is available, else on the CPU.

- `model/`: the model weights (safetensors) and tokenizer
- `app_config.json`: the page title, default system prompt and stop words
"""


APP_PY = r'''"""A chat page for the model in ./model (exported by `lmtune export app`).

Run:  pip install -r requirements.txt && python app.py [--host 127.0.0.1] [--port 7860]
"""

import argparse
import json
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "app_config.json").read_text(encoding="utf-8"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

tokenizer = AutoTokenizer.from_pretrained(HERE / "model")
model = AutoModelForCausalLM.from_pretrained(
    HERE / "model", dtype=torch.float32 if DEVICE == "cpu" else "auto"
).to(DEVICE).eval()

# End-of-turn ids: the model's eos plus any stop word that is a single token.
vocab = tokenizer.get_vocab()
eos = model.generation_config.eos_token_id
EOS_IDS = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                  *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
                  *(vocab[w] for w in CONFIG["stop_words"] if w in vocab)})
TEXT_STOPS = [w for w in CONFIG["stop_words"] if w and w not in vocab]
LOCK = threading.Lock()  # one generation at a time; others wait their turn


def text_of(content):
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(c) for c in content)
    return ""


def respond(message, history, system, temperature, top_p, max_new_tokens):
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant"):
            messages.append({"role": m["role"], "content": text_of(m["content"])})
    messages.append({"role": "user", "content": text_of(message)})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(DEVICE)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    sampling = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p)) if temperature > 0 \
        else dict(do_sample=False)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=int(max_new_tokens), eos_token_id=EOS_IDS,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else EOS_IDS[0],
                  **sampling)
    if TEXT_STOPS:  # multi-token stop words end generation too
        kwargs.update(stop_strings=TEXT_STOPS, tokenizer=tokenizer)

    def run():
        with LOCK, torch.inference_mode():
            model.generate(**kwargs)

    threading.Thread(target=run, daemon=True).start()
    text = ""
    for piece in streamer:
        text += piece
        cut = min((i for i in (text.find(w) for w in TEXT_STOPS) if i >= 0), default=-1)
        if cut >= 0:
            yield text[:cut]
            return
        yield text


def main():
    parser = argparse.ArgumentParser(description=CONFIG["title"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args()
    demo = gr.ChatInterface(
        respond,
        title=CONFIG["title"],
        additional_inputs=[
            gr.Textbox(CONFIG.get("system") or "", label="System prompt"),
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p"),
            gr.Slider(16, 4096, value=args.max_new_tokens, step=16, label="Max new tokens"),
        ],
        analytics_enabled=False,
        api_name="chat",  # POST /gradio_api/call/chat
    )
    print(f"{CONFIG['title']}: http://{args.host}:{args.port} (model on {DEVICE})", flush=True)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                        theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                                font_mono=["ui-monospace", "monospace"]))


if __name__ == "__main__":
    main()
'''
