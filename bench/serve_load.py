"""Load test for `lmtune serve`: N concurrent streaming clients on loopback, every answer checked.

Starts `lmtune serve MODEL` (default settings: continuous batching, --max-batch 64) on a free
127.0.0.1 port, then:

1. asks each prompt alone, one request at a time (its *solo* greedy answer; also the single-stream
   speed: completion tokens / latency of a lone request);
2. for each N in --clients: sends N streaming chat requests at once (distinct prompts, greedy) and
   checks that every stream completed (a finish_reason, then [DONE], one id) and that every
   streamed answer equals that prompt's solo answer (none mixed up, none changed by batching).

Prints a markdown table and the targets of issue 17 (p50 latency at 32 clients <= 6.5 s,
aggregate tokens/s >= 4x a single stream). Time-bounded: everything stops after --time-limit s.
Exit status 0 only when every stream completed and matched its solo answer.

    python bench/serve_load.py                         # 32 and 64 clients, embedded model, 32 tokens
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

TOPICS = ["the moon", "a volcano", "the ocean", "a library", "a violin", "the desert", "a glacier", "a bicycle",
          "the heart", "a lighthouse", "a honeybee", "the internet", "a rainbow", "a castle", "the wind",
          "a comet"]


def prompts(n: int) -> list[str]:
    return [f"Request {i}: in one sentence, what is {TOPICS[i % len(TOPICS)]}? ({i * 7 + 3})" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


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


async def solo_pass(url: str, model: str, ps: list[str], max_tokens: int, deadline: float) -> list[dict]:
    """Each prompt alone, one after the other: the reference answers and the single-stream speed."""
    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:
        for p in ps:
            if time.time() > deadline:
                raise TimeoutError("time limit reached during the solo pass")
            out.append(await stream_one(client, url, model, p, max_tokens))
    return out


async def concurrent_pass(url: str, model: str, ps: list[str], max_tokens: int, deadline: float):
    timeout = httpx.Timeout(max(10.0, deadline - time.time()), connect=30)
    limits = httpx.Limits(max_connections=len(ps) + 4, max_keepalive_connections=len(ps) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(stream_one(client, url, model, p, max_tokens) for p in ps), return_exceptions=True),
            timeout=max(1.0, deadline - time.time()))
        return results, time.perf_counter() - t0


def start_server(model: str, threads: int | None, extra: list[str], deadline: float):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    server = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "serve", model, "--port", str(port),
                               "--model-name", "bench", *extra],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            server.kill()
            raise TimeoutError("the server did not start in time")
        time.sleep(0.3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for the server (OMP_NUM_THREADS)")
    ap.add_argument("--server-args", default="", help="extra `lmtune serve` flags, e.g. '--max-batch 32'")
    ap.add_argument("--time-limit", type=float, default=1200, help="stop everything after this many seconds")
    args = ap.parse_args()

    deadline = time.time() + args.time_limit
    load_before = os.getloadavg()[0]
    ps = prompts(max(args.clients))
    server, url = start_server(args.model, args.threads, args.server_args.split(), deadline)
    rows, failed = [], False
    try:
        # warm-up (first-call allocations) so the table shows steady-state numbers
        httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": "bench", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
        solo = asyncio.run(solo_pass(url, "bench", ps, args.max_tokens, deadline))
        single_tps = sum(r["tokens"] for r in solo) / sum(r["latency"] for r in solo)
        for n in args.clients:
            results, wall = asyncio.run(concurrent_pass(url, "bench", ps[:n], args.max_tokens, deadline))
            good = [r for r in results if not isinstance(r, BaseException) and r.get("ok")]
            same = sum(1 for r, ref in zip(results, solo)
                       if not isinstance(r, BaseException) and r.get("ok") and r["text"] == ref["text"])
            tokens = sum(r["tokens"] for r in good)
            lats = [r["latency"] for r in good]
            ttfts = [r["ttft"] for r in good if r["ttft"] is not None]
            rows.append(dict(n=n, completed=len(good), same=same, wall=wall, tps=tokens / wall,
                             ttft50=pct(ttfts, 50), ttft95=pct(ttfts, 95), lat50=pct(lats, 50), lat95=pct(lats, 95),
                             tokens=tokens))
            failed |= len(good) < n or same < n
            for r in results:
                if isinstance(r, BaseException) or not r.get("ok"):
                    print(f"error: {r!r}"[:300], file=sys.stderr)
                    break
            for r, ref in zip(results, solo):
                if not isinstance(r, BaseException) and r.get("ok") and r["text"] != ref["text"]:
                    print(f"differs from solo:\n  batched {r['text']!r}\n  solo    {ref['text']!r}", file=sys.stderr)
                    break
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"\n`lmtune serve {args.model}` {args.server_args} on {platform.machine()} CPU ({os.cpu_count()} cores), "
          f"loopback, streaming clients, greedy, max_tokens={args.max_tokens}, server threads="
          f"{args.threads or 'default'}, {time.strftime('%Y-%m-%d %H:%M')}; 1-min load average at the start "
          f"{load_before:.2f}, at the end {os.getloadavg()[0]:.2f}\n")
    print(f"Single stream (each prompt alone, {len(solo)} requests): {single_tps:.1f} tokens/s, latency p50 "
          f"{pct([r['latency'] for r in solo], 50):.2f} s\n")
    print("| clients | completed | equal to solo | wall s | tokens/s | × single stream | TTFT p50 s | TTFT p95 s | "
          "latency p50 s | latency p95 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['completed']}/{r['n']} | {r['same']}/{r['n']} | {r['wall']:.1f} | {r['tps']:.1f} | "
              f"{r['tps'] / single_tps:.1f}× | {r['ttft50']:.2f} | {r['ttft95']:.2f} | {r['lat50']:.2f} | "
              f"{r['lat95']:.2f} |")
    for r in rows:
        if r["n"] == 32:
            print(f"\ntargets (issue 17): p50 latency at 32 clients {r['lat50']:.2f} s (<= 6.5: "
                  f"{'yes' if r['lat50'] <= 6.5 else 'NO'}); aggregate {r['tps'] / single_tps:.1f}× a single "
                  f"stream (>= 4: {'yes' if r['tps'] >= 4 * single_tps else 'NO'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
