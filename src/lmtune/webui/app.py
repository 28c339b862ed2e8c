"""`lmtune webui`: train, watch, chat and export from one browser page (Gradio).

The page is a front for the command line: Train writes a normal config file and runs
`lmtune train` as a subprocess (runs.py), Export runs `lmtune convert` / `lmtune export`, and
Chat loads a model with the same engine and chat panel as `lmtune web`. What a run shows (progress,
loss curve, probe answers, output) is read back from its work dir, so it survives a page reload.
Binds 127.0.0.1 unless --host says otherwise; no analytics, no external fonts, no share links.
"""

from __future__ import annotations

import contextlib
import gc
import html
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from lmtune.errors import UserError
from lmtune.webui import form as F
from lmtune.webui import runs

NO_BASE = "(none)"
CSS = """
.webui-err p { color: #b91c1c; font-size: 0.86em; margin: 2px 0 0 0; white-space: pre-wrap; }
.webui-bar { height: 14px; border-radius: 7px; background: #e5e7eb; overflow: hidden; }
.webui-bar > div { height: 100%; background: #f97316; transition: width 0.4s; }
.webui-state { font-weight: 600; }
.webui-error { color: #b91c1c; white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.86em; }
.webui-sample { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.84em;
                border: 1px solid #e5e7eb; border-radius: 6px; padding: 6px 8px; margin: 4px 0; }
.webui-sample .masked { color: #9ca3af; }
.webui-check { white-space: pre; font-family: ui-monospace, monospace; font-size: 0.8em; overflow-x: auto; }
.webui-logbox { max-height: 300px; overflow: auto; display: flex; flex-direction: column-reverse;
                border: 1px solid #e5e7eb; border-radius: 6px; background: #fafafa; }
.webui-logbox pre { margin: 0; padding: 6px 8px; font-size: 0.78em; white-space: pre-wrap; word-break: break-all; }
"""
STATE_TEXT = {"none": "no run yet", "running": "running", "finished": "finished", "stopped": "stopped",
              "failed": "failed", "ended": "ended"}
STATE_COLOR = {"running": "#2563eb", "finished": "#16a34a", "stopped": "#b45309", "failed": "#b91c1c",
               "ended": "#6b7280", "none": "#6b7280"}


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise UserError("`lmtune webui` needs gradio", hint="pip install 'lmtune[serve]'  (or: pip install gradio)") from None
    return gr


# --------------------------------------------------------------------------- rendering (plain HTML)


def progress_html(p: runs.Progress) -> str:
    if p.total:
        text = f"step {min(p.step, p.total)} / {p.total} ({p.percent:.0f}%)"
    else:
        text = "waiting for the first step…" if p.state == "running" else "—"
    return (f'<div class="webui-bar"><div style="width:{p.percent:.1f}%"></div></div>'
            f'<div class="webui-progress-text" style="margin-top:4px">{html.escape(text)}</div>')


def status_html(p: runs.Progress) -> str:
    color = STATE_COLOR.get(p.state, "#6b7280")
    parts = [f'<span class="webui-state" style="color:{color}">● {STATE_TEXT.get(p.state, p.state)}</span>']
    if p.command:
        parts.append(f" &nbsp;<code>{html.escape(p.command)}</code>")
    if p.state == "failed" and p.returncode is not None:
        parts.append(f" (exit status {p.returncode})")
    if p.error:
        parts.append(f'<div class="webui-error">{html.escape(p.error)}</div>')
    return "".join(parts)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def loss_svg(losses: list, lrs: list | None = None, total: int | None = None, width: int = 640,
             height: int = 240) -> str:
    """The loss curve as an inline SVG (one circle per logged step), the learning rate dashed on
    its own scale. Inline so it needs no plotting library or network."""
    left, right, top, bottom = 56, 56 if lrs else 16, 14, 34
    w, h = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'style="max-width:{width}px;font:12px sans-serif">',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#d1d5db"/>']
    if not losses:
        parts.append(f'<text x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle" fill="#9ca3af">'
                     'the loss curve appears here once training logs its first step</text></svg>')
        return "".join(parts)
    x_max = max(total or 0, losses[-1][0], 1)
    ys = [v for _, v in losses]
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.08 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def sx(step):
        return left + w * step / x_max

    def sy(v, lo=y_lo, hi=y_hi):
        return top + h * (1 - (v - lo) / (hi - lo))

    for t in _ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#f3f4f6"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="#6b7280">{t:.3g}</text>')
    for t in _ticks(0, x_max):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + h + 16}" text-anchor="middle" fill="#6b7280">{t:.0f}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 2}" text-anchor="middle" fill="#374151">step</text>'
                 f'<text x="12" y="{top + h / 2}" transform="rotate(-90 12 {top + h / 2})" text-anchor="middle" '
                 f'fill="#ea580c">loss</text>')
    if lrs:
        lr_hi = max(v for _, v in lrs) or 1.0
        pts = " ".join(f"{sx(s):.1f},{sy(v, 0, lr_hi * 1.08):.1f}" for s, v in lrs)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#60a5fa" stroke-width="1.2" '
                     f'stroke-dasharray="4 3"/>')
        for t in _ticks(0, lr_hi * 1.08, 2):
            parts.append(f'<text x="{left + w + 6}" y="{sy(t, 0, lr_hi * 1.08) + 4:.1f}" fill="#60a5fa">{t:.1e}</text>')
        parts.append(f'<text x="{width - 6}" y="{top + h / 2}" transform="rotate(90 {width - 6} {top + h / 2})" '
                     f'text-anchor="middle" fill="#60a5fa">learning rate</text>')
    pts = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in losses)
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#ea580c" stroke-width="1.8"/>')
    r = 3 if len(losses) <= 60 else 1.5
    for s, v in losses:
        parts.append(f'<circle class="loss-point" data-step="{s}" cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="{r}" '
                     f'fill="#ea580c"><title>step {s}: loss {v:.4f}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def log_html(text: str) -> str:
    """The end of a log in a box that stays scrolled to its bottom (column-reverse)."""
    return f'<div class="webui-logbox"><pre>{html.escape(text or "(no output yet)")}</pre></div>'


def stats_md(p: runs.Progress) -> str:
    if not p.losses:
        return ""
    step, loss = p.losses[-1]
    items = [f"**loss** {loss:.4f} (step {step})"]
    if p.lrs:
        items.append(f"**learning rate** {p.lrs[-1][1]:.2e}")
    if p.tokens_per_s is not None:
        items.append(f"**tokens/s** {p.tokens_per_s:,.0f}")
    if p.epoch is not None:
        items.append(f"**epoch** {p.epoch:.2f}")
    return " · ".join(items)


def probes_md(p: runs.Progress) -> str:
    if not p.probes:
        return "*Probe answers (the evaluation questions, answered during training) appear here.*"
    lines = [f"**Probe answers at step {p.probe_step}**"]
    for a in p.probes:
        answer = (a.get("answer") or "").strip() or "(empty)"
        lines.append(f"- **Q:** {a.get('question', '')}\n  **A:** {answer}")
    return "\n".join(lines)


def samples_html(shown: str) -> str:
    """`data show --show masked_text` output as HTML: text without loss greyed."""
    from lmtune.data.tools import MASK_CLOSE, MASK_OPEN

    out = []
    for block in re.split(r"^(?==== )", shown, flags=re.M):
        if not block.strip():
            continue
        head, _, body = block.partition("\n")
        pattern = re.escape(MASK_OPEN) + r"(.*?)" + re.escape(MASK_CLOSE)
        pieces, last = [], 0
        for m in re.finditer(pattern, body, flags=re.S):
            pieces.append(html.escape(body[last:m.start()]))
            pieces.append(f'<span class="masked">{html.escape(m.group(1))}</span>')
            last = m.end()
        pieces.append(html.escape(body[last:]))
        out.append(f'<div><b>{html.escape(head.strip("= "))}</b><div class="webui-sample">{"".join(pieces).strip()}'
                   "</div></div>")
    return "".join(out)


_STDOUT_LOCK = threading.Lock()


def data_preview(cfg, n: int = 3) -> str:
    """A few samples as the trainer sees them, and `lmtune data check`'s report, as HTML."""
    from lmtune.data import tools

    with _STDOUT_LOCK:  # the data commands print; catch what they print
        shown, checked = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(shown):
            tools.show_command(cfg, mode="masked_text", n=n)
        with contextlib.redirect_stdout(checked):
            tools.check_command(cfg)
    return ('<p><i>Greyed text carries no loss: the model learns to write what is not grey.</i></p>'
            + samples_html(shown.getvalue())
            + f'<p><b>lmtune data check</b></p><div class="webui-check">{html.escape(checked.getvalue())}</div>')


# --------------------------------------------------------------------------- the chat model


class ChatSlot:
    """The one model the Chat tab talks to (loaded in the page process: chat needs it there)."""

    def __init__(self):
        self.engine = None
        self.label = None
        self._lock = threading.Lock()

    def current(self):
        return self.engine

    def unload(self) -> None:
        with self._lock:
            old, self.engine, self.label = self.engine, None, None
        if old is not None:
            old.close()  # stops its worker, which would otherwise keep the model alive
        del old
        gc.collect()

    def load(self, model: str, adapter: str | None = None):
        from lmtune.serve.engine import Engine

        if not model:
            raise UserError("choose a model to chat with (a folder, a work dir, a hub id or smollm2-135m-instruct)")
        self.unload()
        engine = Engine.load(model, adapter=adapter or None)
        with self._lock:
            self.engine, self.label = engine, model + (f" + {adapter}" if adapter else "")
        return engine


# --------------------------------------------------------------------------- the page


class Page:
    """State shared by every open tab of the page: the chat model, the running export, the work
    dir last used (a reloaded page shows that run again)."""

    def __init__(self, work_dir: str, gpus: int):
        self.work_dir = work_dir
        self.gpus = gpus
        self.chat = ChatSlot()
        self.export: subprocess.Popen | None = None  # the export running (or last run) from the page


def _config_path(work_dir: str) -> Path:
    return Path(work_dir) / runs.CONFIG_NAME


def _base_datasets(base: str | None) -> list:
    if not base:
        return []
    from lmtune.config import load_raw

    raw, _, _ = load_raw(base)
    ds = raw.get("datasets") or raw.get("data_path") or []
    return ds if isinstance(ds, list) else [ds]


def build_app(work_dir: str = "work_dirs/webui", gpus: int | None = None):
    """The page (a gr.Blocks; call .launch(css=CSS)). `gpus`: None = count them (nvidia-smi)."""
    gr = _import_gradio()
    from lmtune.config import list_builtin, load_config
    from lmtune.serve.web import chat_panel, max_new_tokens_limit

    gpus = F.gpu_count() if gpus is None else gpus
    page = Page(work_dir, gpus)
    d = F.defaults(gpus)
    form, errs = {}, {}

    def err_box(key):
        errs[key] = gr.Markdown("", visible=False, elem_id=f"webui-err-{key}", elem_classes=["webui-err"])

    def number(key, label, precision=None, **kw):
        form[key] = gr.Number(d[key], label=label, precision=precision, elem_id=f"webui-{key}", **kw)
        err_box(key)

    with gr.Blocks(title="lmtune webui", analytics_enabled=False) as demo:
        gr.Markdown("## lmtune · train, chat, export\nEverything here runs the `lmtune` command line; each step "
                    "shows the command, so you can repeat it from a shell.")
        base_state = gr.State(None)
        with gr.Tabs(elem_id="webui-tabs"):
            # ------------------------------------------------------------------ Train
            with gr.Tab("Train", id="train", elem_id="webui-tab-train"):
                with gr.Row(equal_height=True):
                    builtin = gr.Dropdown([NO_BASE, *list_builtin()], value=NO_BASE, filterable=True, scale=3,
                                          label="Start from a built-in config (lmtune list-cfg)",
                                          elem_id="webui-builtin")
                    cfg_file = gr.Textbox(label="…or a config file", placeholder="path/to/config.py", scale=3,
                                          elem_id="webui-config-file")
                    load_btn = gr.Button("Load config", scale=1, elem_id="webui-load")
                load_msg = gr.Markdown(elem_id="webui-load-msg")
                with gr.Row():
                    with gr.Column(scale=3, min_width=200):
                        form["model"] = gr.Dropdown(F.model_choices(), value=d["model"], allow_custom_value=True,
                                                    filterable=True, label="Model: built-in name, folder or hub id",
                                                    elem_id="webui-model")
                        err_box("model")
                    with gr.Column(scale=2, min_width=200):
                        form["method"] = gr.Radio(list(F.METHODS), value=d["method"], label="Method",
                                                  elem_id="webui-method")
                        err_box("method")
                    with gr.Column(scale=1, min_width=140):
                        form["objective"] = gr.Dropdown(F.objectives(), value=d["objective"], label="Objective",
                                                        elem_id="webui-objective")
                        err_box("objective")
                with gr.Row():
                    with gr.Column(scale=4):
                        form["datasets"] = gr.Textbox(d["datasets"], lines=2, label="Data files (one per line)",
                                                      placeholder="data/my_conversations.jsonl",
                                                      elem_id="webui-datasets")
                        err_box("datasets")
                    with gr.Column(scale=1, min_width=180):
                        form["data_format"] = gr.Dropdown(F.data_formats(), value=d["data_format"],
                                                          label="Data format", elem_id="webui-data_format")
                        err_box("data_format")
                        upload = gr.UploadButton("Upload files…", file_count="multiple", size="sm",
                                                 elem_id="webui-upload")
                preview_btn = gr.Button("Preview data", size="sm", elem_id="webui-preview-btn")
                preview = gr.HTML(elem_id="webui-preview")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        with gr.Column(min_width=120):
                            number("lr", "Learning rate")
                        with gr.Column(min_width=120):
                            number("max_epochs", "Epochs")
                        with gr.Column(min_width=120):
                            number("max_steps", "Steps (0: by epochs)", precision=0)
                        with gr.Column(min_width=120):
                            number("max_length", "Max length (tokens)", precision=0)
                        with gr.Column(min_width=120):
                            number("batch_size", "Batch size", precision=0)
                        with gr.Column(min_width=120):
                            number("accumulative_counts", "Accumulation", precision=0)
                    with gr.Row():
                        with gr.Column(min_width=120):
                            number("lora_r", "LoRA r", precision=0)
                        with gr.Column(min_width=120):
                            number("lora_alpha", "LoRA alpha", precision=0)
                        with gr.Column(min_width=120):
                            number("save_steps", "Checkpoint every (steps)", precision=0)
                        with gr.Column(min_width=120):
                            number("evaluation_freq", "Probe every (steps; 0: start and end)", precision=0)
                        with gr.Column(min_width=120):
                            form["pack_to_max_length"] = gr.Checkbox(d["pack_to_max_length"], label="Packing",
                                                                     elem_id="webui-pack_to_max_length")
                            err_box("pack_to_max_length")
                    with gr.Row():
                        with gr.Column():
                            form["system"] = gr.Textbox(d["system"], lines=2, label="System prompt (optional)",
                                                        elem_id="webui-system")
                            err_box("system")
                        with gr.Column():
                            form["evaluation_inputs"] = gr.Textbox(
                                d["evaluation_inputs"], lines=2, elem_id="webui-evaluation_inputs",
                                label="Probe questions, one per line (answered while training)")
                            err_box("evaluation_inputs")
                    with gr.Row(visible=gpus > 0):
                        with gr.Column():
                            form["scaling"] = gr.Dropdown(F.scaling_choices(), value=d["scaling"],
                                                          label=f"Scaling over the {gpus} GPU(s): DDP, FSDP2 or a "
                                                                "DeepSpeed ZeRO stage", elem_id="webui-scaling")
                            err_box("scaling")
                        with gr.Column():
                            form["nproc"] = gr.Number(d["nproc"], precision=0, label="Processes (GPUs)",
                                                      elem_id="webui-nproc")
                            err_box("nproc")
                with gr.Row(equal_height=True):
                    work = gr.Textbox(work_dir, label="Work dir (checkpoints, logs, the final model)", scale=3,
                                      elem_id="webui-work-dir")
                    overwrite = gr.Checkbox(False, label="Start afresh: remove the previous run there (--overwrite)",
                                            scale=2, elem_id="webui-overwrite")
                with gr.Row():
                    show_btn = gr.Button("Show command", elem_id="webui-show")
                    save_btn = gr.Button("Save config", elem_id="webui-save")
                    start_btn = gr.Button("Start", variant="primary", elem_id="webui-start")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="webui-stop")
                    resume_btn = gr.Button("Resume", elem_id="webui-resume")
                message = gr.Markdown(elem_id="webui-message")
                config_view = gr.Code(language="python", visible=False, label="The config file",
                                      elem_id="webui-config-view")
                with gr.Group():
                    status = gr.HTML(elem_id="webui-status")
                    progress = gr.HTML(elem_id="webui-progress")
                with gr.Row():
                    with gr.Column(scale=3):
                        curve = gr.HTML(loss_svg([]), elem_id="webui-loss")
                    with gr.Column(scale=2):
                        stats = gr.Markdown(elem_id="webui-stats")
                        probes = gr.Markdown(elem_id="webui-probes")
                gr.Markdown(f"Output (`{runs.OUTPUT_LOG}` in the work dir)")
                log = gr.HTML(log_html(""), elem_id="webui-log")
                timer = gr.Timer(2.0)

            # ------------------------------------------------------------------ Chat
            with gr.Tab("Chat", id="chat", elem_id="webui-tab-chat"):
                with gr.Row():
                    chat_model = gr.Textbox(label="Model: a folder, a work dir, a hub id or smollm2-135m-instruct",
                                            scale=4, elem_id="webui-chat-model")
                    chat_adapter = gr.Textbox(label="LoRA adapter (optional)", scale=3, elem_id="webui-chat-adapter")
                with gr.Row():
                    use_trained = gr.Button("Use the trained model", size="sm", elem_id="webui-chat-trained")
                    chat_load = gr.Button("Load", variant="primary", size="sm", elem_id="webui-chat-load")
                    chat_unload = gr.Button("Unload", size="sm", elem_id="webui-chat-unload")
                chat_status = gr.Markdown("*No model loaded.*", elem_id="webui-chat-status")
                panel = chat_panel(page.chat.current, no_engine="Load a model above first.", autofocus=False)

            # ------------------------------------------------------------------ Export
            with gr.Tab("Export", id="export", elem_id="webui-tab-export") as export_tab:
                kinds = runs.export_kinds()
                export_kind = gr.Radio([(label, k) for k, label in kinds.items()], value="pth_to_hf",
                                       label="Export", elem_id="webui-export-kind")
                with gr.Row():
                    export_src = gr.Textbox(label="From (a checkpoint for pth_to_hf; an adapter for merge; a model, "
                                                  "adapter or work dir otherwise)", scale=4, elem_id="webui-export-src")
                    export_base = gr.Textbox(label="Base model (merge)", scale=2, elem_id="webui-export-base")
                    fill_btn = gr.Button("Fill from the work dir", scale=1, size="sm", elem_id="webui-export-fill")
                with gr.Row(equal_height=True):
                    export_out = gr.Textbox(label="Output path", scale=4, elem_id="webui-export-out")
                    export_overwrite = gr.Checkbox(False, label="Replace the output if it exists (--overwrite)",
                                                   scale=2, elem_id="webui-export-overwrite")
                with gr.Row():
                    export_btn = gr.Button("Export", variant="primary", elem_id="webui-export-run")
                    export_stop = gr.Button("Stop", variant="stop", elem_id="webui-export-stop")
                export_status = gr.Markdown(elem_id="webui-export-status")
                export_log = gr.HTML(log_html(""), elem_id="webui-export-log")

        form_keys = list(form)
        form_inputs = [form[k] for k in form_keys]
        err_outputs = [errs[k] for k in form_keys]
        n_form = len(form_keys)

        # ---------------------------------------------------------------- Train handlers
        def split(args):
            values = dict(zip(form_keys, args[:n_form]))
            return values, args[n_form:]

        def error_updates(e: UserError | None):
            """Each field's error box, and the general message (errors no field owns)."""
            field = runs.error_field(e) if e is not None else None
            if field == "scaling" and not gpus:
                field = None
            boxes = [gr.update(value=f"⚠ {e}" if k == field else "", visible=k == field) for k in form_keys]
            general = f"**⚠ {html.escape(str(e))}**".replace("\n", "  \n") if e is not None and field not in form else ""
            return boxes, general

        def prepare(args, write: bool):
            values_in, (base, w, *_rest) = split(args)
            if not (w or "").strip():
                raise UserError("choose a work dir")
            values = F.config_values(values_in, _base_datasets(base), gpus)
            path = _config_path(w.strip())
            if write:
                runs.write_config(path, values, base)
            else:
                runs.check_config(path, runs.config_text(values, base))
            page.work_dir = w.strip()
            return values_in, base, w.strip(), path

        def command_md(path, w, *, resume=False, ow=False, nproc=None) -> str:
            args = runs.train_args(path, w, resume=resume, overwrite=ow, nproc=nproc)
            return f"```\n{runs.shell_command(args)}\n```\n(from `{os.getcwd()}`)"

        def on_show(*args):
            try:
                values_in, base, w, path = prepare(args, write=False)
            except UserError as e:
                boxes, general = error_updates(e)
                return [*boxes, general, gr.update(visible=False)]
            boxes, _ = error_updates(None)
            ow = args[-1]
            values = F.config_values(values_in, _base_datasets(base), gpus)
            text = runs.config_text(values, base)
            msg = (f"Start writes **{path}** (shown below) and runs:\n"
                   + command_md(path, w, ow=ow, nproc=F.processes(values_in, gpus)))
            return [*boxes, msg, gr.update(value=text, visible=True)]

        def on_save(*args):
            try:
                _, _, w, path = prepare(args, write=True)
            except UserError as e:
                boxes, general = error_updates(e)
                return [*boxes, general]
            boxes, _ = error_updates(None)
            return [*boxes, f"Saved **{path}**. Train it from a shell with\n" + command_md(path, w)]

        def on_start(*args, resume=False):
            try:
                values_in, _, w, path = prepare(args, write=True)
                ow = bool(args[-1]) and not resume
                info = runs.start_train(path, w, resume=resume, overwrite=ow, nproc=F.processes(values_in, gpus))
            except UserError as e:
                boxes, general = error_updates(e)
                return [*boxes, general]
            boxes, _ = error_updates(None)
            return [*boxes, f"{'Resumed' if resume else 'Started'} (pid {info.pid}):\n```\n{info.shell}\n```"]

        def on_resume(*args):
            return on_start(*args, resume=True)

        def on_stop(w):
            try:
                return runs.stop_train(w)
            except UserError as e:
                return f"**⚠ {e}**"

        def on_refresh(w):
            p = runs.read_progress(w) if w else runs.Progress()
            return (status_html(p), progress_html(p), loss_svg(p.losses, p.lrs, p.total), stats_md(p),
                    probes_md(p), log_html(p.log_tail))

        def on_load_config(name, path):
            base = (path or "").strip() or (name if name and name != NO_BASE else None)
            if not base:
                return [gr.update() for _ in form_keys] + [None, "Choose a built-in config or a config file first."]
            try:
                cfg = load_config(base)
            except UserError as e:
                return [gr.update() for _ in form_keys] + [None, f"**⚠ {html.escape(str(e))}**"]
            values = F.form_from_config(cfg)
            updates = [gr.update(value=values[k]) if values.get(k) is not None else gr.update() for k in form_keys]
            return updates + [base, f"Loaded **{base}**: the fields below start from it; its other keys are kept "
                                    "as they are in the config the page writes."]

        def on_upload(files, current, w):
            """Copy uploaded files into WORK_DIR/data/ (a copy the config can name for good)."""
            dest = Path(w or page.work_dir) / "data"
            dest.mkdir(parents=True, exist_ok=True)
            paths = [p for p in (current or "").splitlines() if p.strip()]
            for f in files or []:
                src = Path(f if isinstance(f, str) else f.name)
                target = dest / src.name
                i = 1
                while target.exists() and target.read_bytes() != src.read_bytes():
                    target = dest / f"{src.stem}_{i}{src.suffix}"
                    i += 1
                shutil.copyfile(src, target)
                if str(target) not in paths:
                    paths.append(str(target))
            return "\n".join(paths)

        def on_preview(*args):
            try:
                values_in, base, w, path = prepare(args, write=False)
                values = F.config_values(values_in, _base_datasets(base), gpus)
                cfg = runs.check_config(path, runs.config_text(values, base))
                shown = data_preview(cfg)
            except UserError as e:
                boxes, general = error_updates(e)
                return [*boxes, general, ""]
            boxes, _ = error_updates(None)
            return [*boxes, "", shown]

        def on_page_load():
            """A reloaded page shows the run last used again, with the form of its config."""
            w = page.work_dir
            updates = [gr.update() for _ in form_keys]
            path = _config_path(w)
            if path.is_file():
                try:
                    values = F.form_from_config(load_config(str(path)))
                    updates = [gr.update(value=values[k]) if values.get(k) is not None else gr.update()
                               for k in form_keys]
                except UserError:
                    pass
            return [w, *updates, *on_refresh(w)]

        train_inputs = [*form_inputs, base_state, work, overwrite]
        monitor = [status, progress, curve, stats, probes, log]
        show_btn.click(on_show, train_inputs, [*err_outputs, message, config_view])
        save_btn.click(on_save, train_inputs, [*err_outputs, message])
        start_btn.click(on_start, train_inputs, [*err_outputs, message]).then(on_refresh, [work], monitor)
        resume_btn.click(on_resume, train_inputs, [*err_outputs, message]).then(on_refresh, [work], monitor)
        stop_btn.click(on_stop, [work], [message]).then(on_refresh, [work], monitor)
        load_btn.click(on_load_config, [builtin, cfg_file], [*form_inputs, base_state, load_msg])
        upload.upload(on_upload, [upload, form["datasets"], work], [form["datasets"]])
        preview_btn.click(on_preview, train_inputs, [*err_outputs, message, preview])
        timer.tick(on_refresh, [work], monitor, show_progress="hidden")
        work.change(on_refresh, [work], monitor, show_progress="hidden")
        demo.load(on_page_load, None, [work, *form_inputs, *monitor])

        # ---------------------------------------------------------------- Chat handlers
        def on_use_trained(w):
            hf = Path(w) / "hf"
            return str(hf) if hf.is_dir() else w, ""

        def on_chat_load(model, adapter):
            model, adapter = (model or "").strip(), (adapter or "").strip()
            yield f"Loading **{model}**{' + ' + adapter if adapter else ''}…", gr.update(), gr.update()
            t0 = time.time()
            try:
                engine = page.chat.load(model, adapter or None)
            except UserError as e:
                yield f"**⚠ {html.escape(str(e))}**", gr.update(), gr.update()
                return
            limit = max_new_tokens_limit(engine)
            yield (f"Loaded **{page.chat.label}** on {engine.device} in {time.time() - t0:.1f} s "
                   f"(context {engine.context_window} tokens). Ask it something below.",
                   gr.update(value=engine.system or ""), gr.update(maximum=limit, value=min(512, limit)))

        def on_chat_unload():
            page.chat.unload()
            return "*No model loaded.*"

        use_trained.click(on_use_trained, [work], [chat_model, chat_adapter])
        chat_load.click(on_chat_load, [chat_model, chat_adapter], [chat_status, panel.system, panel.max_new])
        chat_unload.click(on_chat_unload, None, [chat_status])

        # ---------------------------------------------------------------- Export handlers
        def export_defaults(kind, w):
            from lmtune.train.checkpoint import latest_checkpoint

            w = Path(w or page.work_dir)
            last = latest_checkpoint(w, quiet=True)
            base = ""
            for cfg_path in (w / "config.py", _config_path(str(w))):
                if cfg_path.is_file():
                    try:
                        base = load_config(str(cfg_path)).model
                        break
                    except UserError:
                        pass
            if kind == "pth_to_hf":
                return str(last or ""), "", str(w / f"hf_{last.name}") if last else ""
            if kind == "merge":
                return str(w / "hf"), base, str(w / "merged")
            if kind == "gguf":
                return str(w / "hf"), "", str(w / "model.gguf")
            return str(w / "hf"), "", str(w / "app")

        def on_export(kind, src, base, out, ow, w):
            try:
                args = runs.export_args(kind, source=(src or "").strip(), out=(out or "").strip(),
                                        base=(base or "").strip() or None, overwrite=ow)
            except UserError as e:
                yield f"**⚠ {html.escape(str(e))}**", log_html("")
                return
            log_path = (Path(w) if w and Path(w).is_dir() else Path(os.path.expanduser("~/.cache/lmtune"))) \
                / "webui_export.log"
            if page.export is not None and page.export.poll() is None:
                yield f"**⚠ an export started from this page is still running (pid {page.export.pid})**", gr.update()
                return
            proc = page.export = runs.spawn(args, log_path)
            shown = f"```\n{runs.shell_command(args)}\n```"
            t0 = time.time()
            while proc.poll() is None:
                yield f"Running ({time.time() - t0:.0f} s):\n{shown}", log_html(runs.tail_text(runs.last_attempt(log_path), 200))
                time.sleep(0.5)
            output = runs.last_attempt(log_path)
            if proc.returncode == 0:
                done = f"✓ Done in {time.time() - t0:.0f} s: **{out.strip()}**\n{shown}"
            elif proc.returncode < 0:
                done = f"Stopped.\n{shown}"
            else:
                done = f"**⚠ {html.escape(runs.error_text(output) or f'exit status {proc.returncode}')}**\n{shown}"
            yield done, log_html(runs.tail_text(runs.last_attempt(log_path), 200))

        def on_export_stop():
            proc = page.export
            if proc is not None and proc.poll() is None:  # still our unreaped child: its pid is its own
                runs.stop_group(proc.pid, grace=5)
            return gr.update()

        export_kind.change(export_defaults, [export_kind, work], [export_src, export_base, export_out])
        fill_btn.click(export_defaults, [export_kind, work], [export_src, export_base, export_out])
        export_btn.click(on_export, [export_kind, export_src, export_base, export_out, export_overwrite, work],
                         [export_status, export_log])
        export_stop.click(on_export_stop, None, [export_status])

        def on_export_tab(kind, w, src, base, out):
            if (src or "").strip() or (out or "").strip():
                return src, base, out  # the user's choice stays
            return export_defaults(kind, w)

        export_tab.select(on_export_tab, [export_kind, work, export_src, export_base, export_out],
                          [export_src, export_base, export_out], show_progress="hidden")
    demo.page = page  # for tests
    return demo


def webui_command(args) -> int:
    _import_gradio()
    from lmtune.serve.web import theme

    demo = build_app(work_dir=args.work_dir)
    demo.queue(default_concurrency_limit=8)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[lmtune] warning: the page is reachable by anyone who can reach {args.host}:{args.port}, and it "
              "runs training and export commands on this machine", file=sys.stderr)
    print(f"[lmtune] training page at http://{args.host}:{args.port} (Ctrl-C stops the page; runs it started go on)",
          file=sys.stderr, flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True,
                    ssr_mode=False, quiet=True, footer_links=[], theme=theme(), css=CSS)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e}", hint="pick another --port") from None
    return 0
