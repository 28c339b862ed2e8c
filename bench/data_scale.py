"""Data at scale: `lmtune data prepare` and training start on synthetic pretraining corpora of
~27M and ~270M tokens, one run, the same machine.

For each size: a JSONL corpus of documents (lengths spread from a few words to several times
max_length, so long documents are split) is written once under --root; then, each in its own
process (peak RSS is its own):

  prepare   `lmtune data prepare CONFIG` (num_proc processes): wall time, encoding tokens/s (the
            build's own timing, imports excluded), tokens per CPU-second (less sensitive to other
            load on the machine), peak RSS of the main process and of the largest worker
  start     the real Trainer on the prepared store: Trainer.setup() (imports, tokenizer, the store
            opened through the cache key, a tiny model, optimizer): its time and peak RSS; then its
            first optimizer step (a 2048-token packed row read from the store; its peak RSS is the
            loss over 2048 × 49,152 logits, ~0.8 GB transient, the same at every corpus size)

The model is a tiny random Llama with the SmolLM2 tokenizer (what the test suite uses), so the
figures are those of the data path, not of a model's weights. The store is on the local disk and
in the page cache after `prepare` (a warm start).

    python bench/data_scale.py                       # both sizes (writes ~1.3 GB of corpus under --root)
    python bench/data_scale.py --sizes 27            # only ~27M tokens
    python bench/data_scale.py --keep                # keep corpora and stores for a rerun

Targets (issue 15): peak RSS of prepare and of training start <= 1.5 GB at both sizes and within
10% of each other; tokenisation >= 0.5M tokens/s on 2 cores; training start on the 270M store
<= 10 s. Prints a markdown table (paste it into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

MAX_LENGTH = 2048
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the corpus


def make_corpus(path: Path, tokens: int, tokenizer, seed: int = 0) -> int:
    """Documents of English-like text until about `tokens` tokens; returns the number of documents.

    Words are the tokenizer's own whole-word tokens (Zipf-distributed, sentences of ~14 words), so
    text, JSON and tokens per character are close to ordinary English prose (~1 token a word)."""
    import re

    import numpy as np

    rng = np.random.default_rng(seed)
    # By token id: BPE learns frequent words first, so Zipf ranks follow the ids ("the", "and", ...).
    vocab = np.array([w[1:] for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                      if re.fullmatch(r"Ġ[a-z]{2,12}", w)])
    vocab_dot = np.char.add(vocab, ".")
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    zipf /= zipf.sum()

    def doc(n_words: int) -> str:
        idx = rng.choice(len(vocab), size=n_words, p=zipf)
        dot = rng.random(n_words) < 1 / 14
        dot[-1] = True
        text = " ".join(np.where(dot, vocab_dot[idx], vocab[idx]).tolist())
        return text[0].upper() + text[1:]

    sample = [doc(500) for _ in range(20)]
    per_word = sum(len(x) for x in tokenizer(sample, add_special_tokens=True)["input_ids"]) / (500 * 20)
    target_words = int(tokens / per_word)
    tmp = path.with_suffix(".tmp")
    n_docs = n_words = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while n_words < target_words:
            n = int(min(max(rng.lognormal(6.3, 1.1), 5), 12000))  # median ~550 words, tail to ~6 × max_length
            f.write(json.dumps({"text": doc(n)}) + "\n")
            n_docs += 1
            n_words += n
    os.replace(tmp, path)
    return n_docs


# --------------------------------------------------------------------------- the measured processes


def _peak_mb(who) -> float:
    """Peak RSS in MB. This process: VmHWM (getrusage's ru_maxrss survives exec, so it would start
    at the launching process's RSS); children: the largest ru_maxrss of those waited for (forked
    workers, whose shared pages count from the fork on)."""
    if who == resource.RUSAGE_SELF:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _cpu_s(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def child_prepare(cfg_path: str) -> dict:
    import io
    from contextlib import redirect_stderr

    from lmtune.cli import main

    t0 = time.time()
    log = io.StringIO()
    with redirect_stderr(log):
        rc = main(["data", "prepare", cfg_path])
    wall = time.time() - t0
    sys.stderr.write(log.getvalue())
    # "data: encoded PATH: N conversations, T tokens in S s (...)": the encoding itself, imports excluded
    line = next(x for x in log.getvalue().splitlines() if "data: encoded" in x)
    encode_s = float(line.split(" tokens in ")[1].split("s ")[0])
    return {"rc": rc, "wall_s": wall, "encode_s": encode_s, "rss_main_mb": _peak_mb(resource.RUSAGE_SELF),
            "rss_worker_mb": _peak_mb(resource.RUSAGE_CHILDREN),
            "cpu_s": _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN)}


def child_start(cfg_path: str, work: str) -> dict:
    t0 = time.time()
    from lmtune.config import load_config
    from lmtune.train.loop import Trainer

    cfg = load_config(cfg_path)
    trainer = Trainer(cfg, work)
    trainer.setup()
    t_setup = time.time() - t0
    rss_setup = _peak_mb(resource.RUSAGE_SELF)
    loss, _ = trainer.step()
    t_step = time.time() - t0
    return {"setup_s": t_setup, "first_step_s": t_step, "rss_setup_mb": rss_setup,
            "rss_mb": _peak_mb(resource.RUSAGE_SELF), "rows": len(trainer.rows), "loss": loss,
            "stats": {k: trainer.data_stats.get(k) for k in ("tokens", "samples", "rows", "cache")}}


def child_store(folder: str, n_tokens: int) -> dict:
    """The store layer alone at a given size: write a store of random ids (documents of the same
    length spread as the corpus), then open it, mix and pack it (the rows index) and read rows."""
    import numpy as np

    from lmtune.data.kinds import LM
    from lmtune.data.mix import Sources, StoreRows, make_rows, mix_order
    from lmtune.data.store import open_store, write_store

    rng = np.random.default_rng(0)

    def pieces():
        left = n_tokens
        while left > 0:
            lengths = np.minimum(np.maximum(rng.lognormal(6.3, 1.1, 2000).astype(np.int64) + 1, 2), MAX_LENGTH)
            lengths = lengths[np.cumsum(lengths) <= left] if lengths.sum() > left else lengths
            if not len(lengths):
                lengths = np.array([max(left, 2)])
            left -= int(lengths.sum())
            ids = rng.integers(0, 49152, int(lengths.sum()), dtype=np.uint16)
            mask = np.ones(len(ids), np.uint8)
            mask[np.cumsum(lengths) - lengths] = 0
            n = len(lengths)
            yield {"input_ids": ids, "input_ids.len": lengths, "labels": mask, "conv_nsamples": np.ones(n, np.int64),
                   "conv_skip": np.zeros(n, np.uint8), "conv_trunc": np.zeros(n, np.uint8),
                   "conv_where": np.zeros(0, np.uint8), "conv_where.len": np.zeros(n, np.int64),
                   "sample_loss": lengths - 1}

    t = time.time()
    write_store(Path(folder), "bench", LM.schema, 49152, pieces())
    write_s = time.time() - t
    rss_write = _peak_mb(resource.RUSAGE_SELF)
    t = time.time()
    store = open_store(Path(folder), "bench")
    src = Sources([store])
    order, _ = mix_order(src, [1.0], seed=0)
    offsets, row_samples, _ = make_rows(src, order, True, MAX_LENGTH, True, 0)
    mix_s = time.time() - t
    t = time.time()
    store = open_store(Path(folder), "bench")  # what a training start does: open, index, read rows
    rows = StoreRows(Sources([store]), offsets, row_samples, order, packed=True, fingerprint="")
    for i in rng.integers(0, len(rows), 200).tolist():
        assert len(rows[i]["input_ids"]) <= MAX_LENGTH
    open_s = time.time() - t
    return {"write_s": write_s, "mix_s": mix_s, "open_read_s": open_s, "rows": len(rows),
            "samples": store.n_samples, "rss_write_mb": rss_write, "rss_mb": _peak_mb(resource.RUSAGE_SELF)}


def run_child(args: list[str], env: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="27,270", help="corpus sizes in millions of tokens (comma-separated)")
    ap.add_argument("--root", default="/tmp/lmtune_data_scale", help="corpora, cache and work dirs go here")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep corpora and stores (default: delete at the end)")
    ap.add_argument("--store-only", action="store_true",
                    help="only the store layer (random ids, no tokenizer, no model): write, mix + pack, open + read")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "store":
            out = child_store(rest[0], int(rest[1]))
        else:
            out = child_prepare(*rest) if kind == "prepare" else child_start(*rest)
        print(json.dumps(out))
        return
    if args.store_only:
        store_only(args)
        return

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_llama

    from lmtune.models.loader import load_tokenizer, resolve_model_path

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    model = root / "tiny_model"
    if not (model / "config.json").is_file():
        make_tiny_llama(model, tok)
    env = dict(os.environ, LMTUNE_CACHE_DIR=str(root / "cache"), PYTHONPATH=str(REPO / "src"),
               TOKENIZERS_PARALLELISM="false")
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        corpus = root / f"corpus_{size}M.jsonl"
        if not corpus.is_file():
            t = time.time()
            n_docs = make_corpus(corpus, size * 1_000_000, tok)
            print(f"[bench] wrote {corpus} ({n_docs} documents, {corpus.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.time() - t:.0f}s", file=sys.stderr)
        cfg = root / f"cfg_{size}M.py"
        cfg.write_text("\n".join([
            f"model = {str(model)!r}", f"datasets = [{str(corpus)!r}]", "objective = 'pretrain'",
            f"max_length = {MAX_LENGTH}", "pack_to_max_length = True", f"num_proc = {args.num_proc}",
            "method = 'full'", "batch_size = 1", "accumulative_counts = 1", "max_steps = 1", "mixed_precision = 'no'",
            "save_steps = 1000", "seed = 0"]) + "\n")
        shutil.rmtree(root / "cache" / "data", ignore_errors=True)  # a cold prepare
        print(f"[bench] {size}M: data prepare ...", file=sys.stderr)
        prep = run_child(["prepare", str(cfg)], env)
        print(f"[bench] {size}M: training start ...", file=sys.stderr)
        start = run_child(["start", str(cfg), str(root / f"work_{size}M")], env)
        shutil.rmtree(root / f"work_{size}M", ignore_errors=True)
        tokens = start["stats"]["tokens"]
        results.append({"size": size, "tokens": tokens, "rows": start["rows"], **prep, **start,
                        "tok_s": tokens / prep["encode_s"], "tok_cpu_s": tokens / prep["cpu_s"],
                        "load": os.getloadavg()[0]})
        print(f"[bench] {json.dumps(results[-1])}", file=sys.stderr)
        if not args.keep:
            corpus.unlink(missing_ok=True)
            shutil.rmtree(root / "cache" / "data", ignore_errors=True)

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"num_proc {args.num_proc}, max_length {MAX_LENGTH}, packed pretraining\n")
    print("| corpus | tokens | rows | prepare wall s | encoding tokens/s | tokens per CPU-s "
          "| prepare peak RSS MB (main / worker) | start: setup s | start peak RSS MB (setup) "
          "| 1st step s (peak RSS MB) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| ~{r['size']}M | {r['tokens'] / 1e6:.1f}M | {r['rows']} | {r['wall_s']:.0f} | {r['tok_s'] / 1e6:.2f}M "
              f"| {r['tok_cpu_s'] / 1e6:.2f}M | {r['rss_main_mb']:.0f} / {r['rss_worker_mb']:.0f} | {r['setup_s']:.1f} "
              f"| {r['rss_setup_mb']:.0f} | {r['first_step_s']:.1f} ({r['rss_mb']:.0f}) | {r['load']:.1f} |")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"\nlargest / smallest corpus: prepare peak RSS main {b['rss_main_mb'] / a['rss_main_mb']:.3f}×, "
              f"worker {b['rss_worker_mb'] / a['rss_worker_mb']:.3f}×; start (setup) peak RSS "
              f"{b['rss_setup_mb'] / a['rss_setup_mb']:.3f}×")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def store_only(args) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = []
    for size in [int(s) for s in args.sizes.split(",")]:
        folder = root / f"store_{size}M"
        shutil.rmtree(folder, ignore_errors=True)
        r = run_child(["store", str(folder), str(size * 1_000_000)], env)
        shutil.rmtree(folder, ignore_errors=True)
        out.append((size, r))
        print(f"[bench] {size}M: {json.dumps(r)}", file=sys.stderr)
    print(f"\n{time.strftime('%Y-%m-%d')}, store layer only (random ids), max_length {MAX_LENGTH}, "
          f"load avg {os.getloadavg()[0]:.1f}\n")
    print("| tokens | samples | rows | write s | mix + pack s | open + 200 rows s | peak RSS MB (write / all) |")
    print("|---|---|---|---|---|---|---|")
    for size, r in out:
        print(f"| {size}M | {r['samples']} | {r['rows']} | {r['write_s']:.1f} | {r['mix_s']:.1f} | {r['open_read_s']:.2f} "
              f"| {r['rss_write_mb']:.0f} / {r['rss_mb']:.0f} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
