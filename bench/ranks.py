"""Benchmarks that measure on several ranks: the script re-launched under torchrun as workers, each
printing its results as `RESULT <json>` lines and ending as the mpo command ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, ranks: int, args: list[str]) -> list[dict]:
    """`python SCRIPT --worker ARGS` on `ranks` processes -> every RESULT they printed. A worker that
    fails ends the benchmark with its error output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={_free_port()}", script, "--worker", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def report(results: list[dict]) -> None:
    """A worker's results, then its end (`mpo.distributed.end_process`)."""
    from mpo.distributed import end_process

    for r in results:
        print("RESULT " + json.dumps(r), flush=True)
    end_process(0)
