"""Load test for `lmtune serve`: N concurrent streaming clients on loopback.

Starts `lmtune serve MODEL` on a free 127.0.0.1 port, sends N streaming chat requests at once
(distinct prompts, greedy), then checks that every stream completed (final chunk with a
finish_reason, then [DONE]) and that none got another request's text (--check of the streamed answers must
equal the same prompt's answer asked alone, afterwards). Prints a markdown table. Time-bounded:
everything stops after --time-limit seconds.

    python bench/serve_load.py                    # 32 clients, embedded model, 32 tokens each
    python bench/serve_load.py --clients 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, finish, usage, done, ids = None, "", None, None, False, set()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            ids.add(chunk["id"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text += piece
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
    return {"ok": done and finish in ("stop", "length") and len(ids) == 1, "ttft": ttft,
            "latency": time.perf_counter() - t0, "text": text, "finish": finish,
            "tokens": (usage or {}).get("completion_tokens", 0)}


async def run(url: str, model: str, clients: int, max_tokens: int, deadline: float,
              check: int) -> tuple[list, float, list]:
    prompts = [f"Request {i}: in one sentence, what is {topic}?" for i, topic in
               enumerate([f"the number {i * 7 + 3}" for i in range(clients)])]
    timeout = httpx.Timeout(max(10.0, deadline - time.time()), connect=10)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(stream_one(client, url, model, p, max_tokens) for p in prompts),
                           return_exceptions=True),
            timeout=max(1.0, deadline - time.time()))
        wall = time.perf_counter() - t0
        # Reference answers, one request at a time, to prove no stream got another's tokens.
        refs = []
        for i, p in enumerate(prompts):
            if time.time() > deadline or i % max(1, clients // max(1, check)) or len(refs) - refs.count(None) >= check:
                refs.append(None)
                continue
            r = await client.post(url + "/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": p}], "temperature": 0,
                "max_tokens": max_tokens})
            refs.append(r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None)
    return results, wall, refs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--check", type=int, default=8,
                    help="re-ask this many of the prompts alone (spread over the set) to detect mixed streams")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for the server (OMP_NUM_THREADS); 1 avoids collapse on a shared CPU")
    ap.add_argument("--time-limit", type=float, default=600, help="stop everything after this many seconds")
    args = ap.parse_args()

    deadline = time.time() + args.time_limit
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "serve", args.model, "--port", str(port),
                               "--max-concurrency", str(args.clients + 1), "--model-name", "bench"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                print(server.stderr.read(), file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                print("server did not start in time", file=sys.stderr)
                return 1
            time.sleep(0.3)
        # warm-up (first-call allocations) so the table shows steady-state numbers
        httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "bench", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})

        results, wall, refs = asyncio.run(run(url, "bench", args.clients, args.max_tokens, deadline,
                                                  args.check))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()

    errors = [r for r in results if isinstance(r, BaseException) or not r.get("ok")]
    good = [r for r in results if not isinstance(r, BaseException) and r.get("ok")]
    checked = [(r, ref) for r, ref in zip(results, refs) if ref is not None and not isinstance(r, BaseException)]
    mixed = sum(1 for r, ref in checked if r.get("text") != ref)
    ttfts = [r["ttft"] for r in good if r["ttft"] is not None]
    lats = [r["latency"] for r in good]
    tokens = sum(r["tokens"] for r in good)
    print(f"\n`lmtune serve {args.model}` on {platform.machine()} CPU ({os.cpu_count()} cores), loopback, "
          f"{args.clients} concurrent streaming clients, greedy, max_tokens={args.max_tokens}, "
          f"server threads={args.threads or 'default'}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| clients | completed | mixed up (of checked) | wall s | requests/s | tokens/s | TTFT p50 s | "
          "TTFT p95 s | latency p50 s | latency p95 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {len(good)}/{args.clients} | {mixed} (of {len(checked)}) | {wall:.1f} | "
          f"{len(good) / wall:.2f} | {tokens / wall:.1f} | {pct(ttfts, 50):.2f} | {pct(ttfts, 95):.2f} | "
          f"{pct(lats, 50):.2f} | {pct(lats, 95):.2f} |")
    for e in errors[:5]:
        print(f"\nerror: {e if isinstance(e, BaseException) else e.get('error', e)}", file=sys.stderr)
    if good:
        print(f"\nmean completion tokens {tokens / len(good):.1f}; "
              f"single-stream decode ≈ {statistics.mean(r['tokens'] / max(1e-9, r['latency'] - r['ttft']) for r in good if r['ttft']):.1f} tok/s "
              "(latency includes queueing: requests run one at a time)")
    return 0 if not errors and mixed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
