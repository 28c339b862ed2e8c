"""Starting several training processes: torchrun (one node or many) and SLURM's srun.

`lmtune train CONFIG --nproc-per-node N` re-runs the same command under torchrun:

    python -m torch.distributed.run --nproc-per-node N [--nnodes .. --node-rank .. --master-addr ..
        --master-port ..] -m lmtune.cli train CONFIG ...

Environment (each optional): NPROC_PER_NODE, NNODES (default 1), NODE_RANK (0), ADDR (the
master node's address; MASTER_ADDR works too), PORT (MASTER_PORT; default 29500).

SLURM: with `srun` starting one task per GPU, every task sees SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID; `env_from_slurm` turns them into RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR. With one
task per node running `lmtune train --nproc-per-node G`, torchrun is told the node count, this
node's rank and the master from the SLURM variables. docs/scaling.md has both recipes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from lmtune.errors import UserError


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist.split(",")[0]
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def env_from_slurm(environ=None) -> bool:
    """Under srun with several tasks (and no torchrun), set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT from SLURM's variables. Returns True if it did."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    env.setdefault("MASTER_ADDR", env.get("ADDR") or first_slurm_host(nodes))
    env.setdefault("MASTER_PORT", env.get("PORT") or "29500")
    return True


def torchrun_command(nproc: int, argv: list[str], environ=None) -> list[str]:
    """The torchrun command line that runs `lmtune <argv>` in `nproc` processes on this node."""
    env = os.environ if environ is None else environ
    slurm_nodes = int(env.get("SLURM_NNODES", "1") or 1)
    nnodes = int(env.get("NNODES") or (slurm_nodes if "SLURM_JOB_ID" in env else 1))
    node_rank = int(env.get("NODE_RANK") or (env.get("SLURM_NODEID", "0") if "SLURM_JOB_ID" in env else 0))
    addr = env.get("ADDR") or env.get("MASTER_ADDR")
    if not addr and nnodes > 1 and (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")):
        addr = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
    port = env.get("PORT") or env.get("MASTER_PORT")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        if not addr:
            raise UserError(f"NNODES={nnodes} but no master address",
                            hint="set ADDR (or MASTER_ADDR) to the address of node 0 on every node, "
                            "and NODE_RANK to each node's index")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={addr}",
                f"--master-port={port or 29500}"]
    elif addr or port:
        cmd += ["--nnodes=1", "--node-rank=0", f"--master-addr={addr or '127.0.0.1'}",
                f"--master-port={port or 29500}"]
    else:
        cmd += ["--standalone"]  # one node: torchrun picks a free port
    return cmd + ["-m", "lmtune.cli", *argv]


def relaunch_with_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    """Run this same `lmtune` command in `nproc` processes (per node) through torchrun."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "train" not in argv:
        raise UserError("--nproc-per-node: could not find the train command line to re-run",
                        hint="run: python -m torch.distributed.run --nproc-per-node N -m lmtune.cli train CONFIG")
    cmd = torchrun_command(nproc, argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"[lmtune] starting {nproc} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
