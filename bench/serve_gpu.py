"""GPU serving benchmark: N concurrent streams through lmtune's engine (continuous batching) on a
randomly initialised model of Qwen2.5-1.5B's shape, bf16, one GPU.

The engine is driven in-process, exactly as `lmtune serve` drives it (each request an asyncio
consumer of a `Generation`), without the HTTP layer: the device image has no fastapi/uvicorn, and
HTTP on loopback is not where the time goes. Random weights never say EOS, so every stream runs to
max_new_tokens (a fixed amount of work per request).

Reported: single-stream tokens/s (one request alone), then for each concurrency N: wall time,
aggregate tokens/s and its ratio to a single stream, TTFT and latency percentiles, and how many
of the first --check streams equal their solo greedy tokens (bf16 matmuls of different batch
sizes round differently and a random model's logits are nearly tied, so some may differ here;
the CPU load test checks exact equality on a real model in float32).

    python bench/serve_gpu.py --tokenizer TOKDIR [--clients 1 16 64] [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time


def pct(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def build_engine(tokenizer_dir: str, max_batch: int, smoke: bool = False):
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from lmtune.data.templates import get_template
    from lmtune.serve.engine import Engine

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Qwen2.5-1.5B's published shape
    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    device, dtype = "cuda", torch.bfloat16
    if smoke:  # a quick check of this script on a CPU: a tiny model of the same kind
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads = 64, 128, 2, 4
        cfg.head_dim = 16
        device, dtype = "cpu", torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, tok, get_template("chatml", tok), model_name="qwen2.5-1.5b-shape", device=device,
                    max_batch=max_batch)
    return engine, n_params


def prompts(n):
    topics = ["the moon", "volcanoes", "the ocean", "libraries", "violins", "deserts", "glaciers", "bicycles"]
    return [[{"role": "user", "content": f"Request {i}: tell me about {topics[i % 8]}. " + "Please. " * (i % 23)}]
            for i in range(n)]


async def one(engine, messages, max_new):
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    gen = engine.stream(messages, max_new_tokens=max_new, loop=loop)
    ttft = None
    async for _ in gen:
        if ttft is None:
            ttft = time.perf_counter() - t0
    while not gen.done.is_set():  # the last tokens may decode to no text
        await asyncio.sleep(0.001)
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0, "tokens": gen.completion_tokens, "ids": list(gen.token_ids)}


async def run_n(engine, ps, max_new):
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(engine, p, max_new) for p in ps))
    return res, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder with a ChatML vocabulary (SmolLM2's)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--check", type=int, default=8, help="compare this many streams with their solo tokens")
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU model, to check the script itself")
    ap.add_argument("--profile", action="store_true",
                    help="profile the engine's worker (Python) during the largest run and print the top functions")
    args = ap.parse_args()

    import torch

    t0 = time.time()
    engine, n_params = build_engine(args.tokenizer, args.max_batch, args.smoke)
    if args.smoke:
        torch.cuda.get_device_name = lambda: "CPU (smoke test)"
        torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
    print(f"model: {n_params / 1e9:.2f}B parameters (Qwen2.5-1.5B shape, random init, bf16), "
          f"built in {time.time() - t0:.0f} s; {torch.cuda.get_device_name()}; torch {torch.__version__}",
          flush=True)
    ps = prompts(max(args.clients))
    asyncio.run(run_n(engine, ps[:2], 8))  # warm-up (allocator, kernels)
    solo = [asyncio.run(run_n(engine, [p], args.max_new_tokens))[0][0] for p in ps[:args.check]]
    single_tps = statistics.mean(r["tokens"] / r["latency"] for r in solo)
    print(f"single stream: {single_tps:.1f} tokens/s ({args.max_new_tokens} new tokens, latency "
          f"{statistics.mean(r['latency'] for r in solo):.2f} s)", flush=True)
    rows = []
    prof = None
    if args.profile:
        import cProfile

        from lmtune.serve import batching

        prof = cProfile.Profile()
        for name in ("_decode_step", "_admit", "_drop_done"):
            orig = getattr(batching.Scheduler, name)

            def wrapped(self, *a, _orig=orig, **k):
                if self.running() >= max(args.clients) // 2:
                    prof.enable()
                try:
                    return _orig(self, *a, **k)
                finally:
                    prof.disable()
            setattr(batching.Scheduler, name, wrapped)
    for n in args.clients:
        torch.cuda.reset_peak_memory_stats()
        res, wall = asyncio.run(run_n(engine, ps[:n], args.max_new_tokens))
        tokens = sum(r["tokens"] for r in res)
        same = sum(r["ids"] == s["ids"] for r, s in zip(res, solo))
        rows.append((n, wall, tokens, tokens / wall, pct([r["ttft"] for r in res], 50), pct([r["ttft"] for r in res], 95),
                     pct([r["latency"] for r in res], 50), pct([r["latency"] for r in res], 95),
                     f"{same}/{min(n, len(solo))}", torch.cuda.max_memory_allocated() / 2**30))
        print(f"done {n} clients in {wall:.1f} s", flush=True)
    if prof is not None:
        import pstats

        print(f"decode steps: {engine.scheduler.steps}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    print(f"\n{time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name()}, prompts 25-70 tokens, "
          f"{args.max_new_tokens} new tokens each, greedy, --max-batch {args.max_batch}\n")
    print("| streams | wall s | tokens | tokens/s | × single stream | TTFT p50 s | TTFT p95 s | latency p50 s | "
          "latency p95 s | equal to solo | peak alloc GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, wall, tokens, tps, t50, t95, l50, l95, same, mem in rows:
        print(f"| {n} | {wall:.2f} | {tokens} | {tps:.0f} | {tps / single_tps:.1f}× | {t50:.2f} | {t95:.2f} | "
              f"{l50:.2f} | {l95:.2f} | {same} | {mem:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
