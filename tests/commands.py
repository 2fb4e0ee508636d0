"""Running `mpo` commands from tests: a clean environment, the launcher (torchrun for several ranks),
JSONL in and out."""

import json
import os
import signal
import socket
import subprocess
import sys
import time


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**e, "PYTHONUNBUFFERED": "1"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path):
    # "\n" only: sampled text may hold other characters str.splitlines() would split on (U+2028, \x1c, ...)
    return [x for x in path.read_text(encoding="utf-8").split("\n") if x]


def mpo_cmd(*args, ranks=1):
    launcher = [sys.executable, "-m", "mpo"]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                    f"--master-port={port}", "-m", "mpo"]
    return [*launcher, *map(str, args)]


def run(*args, ranks=1, timeout=900):
    proc = subprocess.run(mpo_cmd(*args, ranks=ranks), capture_output=True, text=True, env=env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def killed_after(args, results, n):
    """Start `mpo ARGS`, SIGKILL it once `results` (a rank's result file) holds n lines; -> its lines then."""
    proc = subprocess.Popen(mpo_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + 300
    while not (results.is_file() and results.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return lines(results)
