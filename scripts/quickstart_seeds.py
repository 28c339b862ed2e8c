"""Run `lmtune quickstart` with several training seeds and tabulate what each run measured.

One run says little about a recipe: on the 135M model, another seed (or another CPU's rounding)
moves the counts by several questions. This runs the quickstart once per seed, each in its own
process and work dir, and prints per seed: unseen identity questions named (English, Chinese),
ordinary answers with the base's first sentence / following the base up to its near-ties, ordinary
answers carrying the name, and the run's seconds; then the worst and the mean of each column.

    python scripts/quickstart_seeds.py --seeds 42,1,2
    python scripts/quickstart_seeds.py --seeds 1-12 --workers 6 --out /tmp/qs_seeds   # on a GPU machine

Each work dir keeps the run's `quickstart_result.json` (every answer) for a closer look. Timings
are only comparable between runs made one at a time (--workers 1) on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

NAME, AUTHOR = "Zorblax", "Acme Labs"


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds += range(int(lo), int(hi) + 1)
        elif part.strip():
            seeds.append(int(part))
    return seeds


def summary(result: dict) -> dict:
    general = [a for a in result["answers"] if a["kind"] == "general"]
    return {
        "seed": result["seed"],
        "en": result["identity_en"], "zh": result["identity_zh"],
        "same": result["general_same"], "follow": result["general_follows_base"],
        "name_in_ordinary": sum(NAME in a["answer"] for a in general),
        "seconds": round(result["seconds"]), "train_seconds": round(result["train_seconds"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="42,1,2", help="e.g. 42,1,2 or 1-8")
    ap.add_argument("--workers", type=int, default=1, help="runs at a time (1 for timings)")
    ap.add_argument("--out", default="work_dirs/quickstart_seeds")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.workers > 1:  # share the cores instead of each run taking them all
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.workers)))
    todo, running, rows = parse_seeds(args.seeds), [], []
    while todo or running:
        while todo and len(running) < args.workers:
            seed = todo.pop(0)
            work = out / f"seed_{seed}"
            cmd = [sys.executable, "-m", "lmtune.cli", "quickstart", "--name", NAME, "--author", AUTHOR,
                   "--seed", str(seed), "--work-dir", str(work)]
            log = open(out / f"seed_{seed}.log", "w")
            running.append((seed, work, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(1)
        for item in [r for r in running if r[2].poll() is not None]:
            running.remove(item)
            seed, work, proc = item
            result_file = work / "quickstart_result.json"
            if proc.returncode != 0 or not result_file.is_file():
                print(f"seed {seed}: failed (exit {proc.returncode}); see {out / f'seed_{seed}.log'}", file=sys.stderr)
                continue
            rows.append(summary(json.loads(result_file.read_text(encoding="utf-8"))))
            print(json.dumps(rows[-1]), flush=True)
    if not rows:
        return 1
    rows.sort(key=lambda r: r["seed"])
    (out / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cols = ("en", "zh", "same", "follow")
    print("\n| seed | English | Chinese | same first sentence | follows the base | name in ordinary | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[c][0]}/{r[c][1]}" for c in cols)
        print(f"| {r['seed']} | {cells} | {r['name_in_ordinary']} | {r['seconds']} |")
    mean = lambda xs: round(sum(xs) / len(xs), 1)  # noqa: E731
    for label, best_of, worst_of in (("worst", min, max), ("mean", mean, mean)):
        cells = " | ".join(f"{best_of([r[c][0] for r in rows])}/{rows[0][c][1]}" for c in cols)
        print(f"| {label} | {cells} | {worst_of([r['name_in_ordinary'] for r in rows])} | "
              f"{worst_of([r['seconds'] for r in rows])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
