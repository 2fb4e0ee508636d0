"""Running `mpo` commands from tests: a clean environment, the launcher (torchrun for several ranks),
training configs for the tiny models, JSONL in and out."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import yaml


def env():
    """The test process's environment without what a process group in it (or the interpreter) set."""
    launched = ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    e = {k: v for k, v in os.environ.items() if k not in launched}
    return {**e, "PYTHONUNBUFFERED": "1"}


def rows(run_dir, split="train"):
    """A run's metrics.jsonl rows of `split` (train or eval)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path):
    # "\n" only: sampled text may hold other characters str.splitlines() would split on (U+2028, \x1c, ...)
    return [x for x in path.read_text(encoding="utf-8").split("\n") if x]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_own(command, ranks):
    """`command` on `ranks` processes started as a cluster launcher (srun, mpirun) starts them: each on its
    own, nothing ending the others when one fails; one thread each, as torchrun gives. -> [Popen] by rank."""
    port = free_port()
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
            for r in range(ranks)]


def launcher(ranks=1):
    return [sys.executable, "-m", "mpo"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}",
        "-m", "mpo"]


def mpo_cmd(*args, ranks=1):
    return [*launcher(ranks), *map(str, args)]


def mpo(*args, ranks=1, check=True, timeout=900):
    """Run `mpo ARGS` to its end (-> the CompletedProcess); check: it must succeed."""
    proc = subprocess.run(mpo_cmd(*args, ranks=ranks), capture_output=True, text=True, env=env(), timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def write_config(path, model_dir, demo_data, **sections):
    """A training config: `model_dir` on the demo data, 4 ZeRO-3 steps of 8 pairs on the CPU, the run
    in PATH's folder/run unless --output-dir says otherwise; `sections` update it key by key."""
    cfg = {
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "data": {"train": str(demo_data / "meta.json"), "eval": str(demo_data / "meta_heldout.json")},
        "loss": {"impl": "torch"},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "train": {"output_dir": str(path.parent / "run"), "device": "cpu", "max_steps": 4, "global_batch_pairs": 8,
                  "max_tokens_per_row": 512},
        "deepspeed": {"zero_stage": 3},
        "logging": {"progress": False, "report_to": []},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


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
