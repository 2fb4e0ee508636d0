"""One process owns a run folder (the lock on `<run>/.lock`), and checkpoints that fail to write or to read
end every rank with one line naming the file, leaving nothing half-written behind."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from commands import env, launcher, mpo, on_own, write_config

HOLDER = """
import sys, time
from pathlib import Path
from mpo.train.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_folder_locked_by_another_process_is_refused_until_that_process_dies(tmp_path):
    from mpo.train.run_lock import RunLock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError) as refused:
            RunLock(run)
        assert f"{run} is in use by another run (pid {holder.pid} on host {socket.gethostname()}, started " \
            in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run):  # the kernel released the killed holder's lock: nothing to clean up
        with pytest.raises(ValueError, match=f"{run} is in use by this process \\(pid {os.getpid()}"):
            RunLock(run)  # a second descriptor of the file would drop the first one's POSIX lock on close
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    RunLock(run).close()


def test_a_damaged_state_file_is_named(tmp_path):
    """A header safetensors cannot parse, or one whose damage renamed a tensor and still parses: a
    ValueError naming the file (safetensors' own error names none)."""
    from mpo.train.state import load_state, save_state

    stem = tmp_path / "optimizer.rank0"
    save_state({"exp_avg": torch.ones(3)}, stem)
    path = tmp_path / "optimizer.rank0.safetensors"
    original = path.read_bytes()
    for where, reason in ((0, "unreadable"), (original.index(b"exp_avg"), "lacks the tensor")):
        damaged = bytearray(original)
        damaged[where] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=f"^{path}: {reason}"):
            load_state(stem)


def test_the_deepspeed_json_refusal_of_an_optimizer_is_readable(tmp_path):
    from mpo.train.config import load_config
    from mpo.train.engine import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    cfg = load_config(None, ["model.path=m", "data.train=d.jsonl", f"deepspeed.config={path}"])
    with pytest.raises(ValueError) as refused:
        deepspeed_config(cfg, torch.float32)
    assert str(refused.value) == (f"deepspeed.config: {path} sets optimizer = {{'type': 'Adam'}}, but this run "
                                  "derives it from the optim section: set that instead")


@pytest.mark.slow
def test_a_second_run_on_a_folder_is_refused_and_a_killed_one_resumes(tmp_path, tiny_models, demo_data):
    """A second `mpo train` (with or without --resume, on one rank or two) or `mpo ref-logps` on a folder a
    run holds is refused naming the holder, and touches nothing; once the holder is SIGKILLed, --resume
    works with no clean-up."""
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 6},
                          deepspeed={"zero_stage": 0}, checkpoint={"every_steps": 2, "export_final": False},
                          data={"eval": ""})
    run = tmp_path / "run"
    first = subprocess.Popen([*launcher(1), "train", str(config), "--output-dir", str(run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (run / "checkpoint-2").is_dir():
            assert first.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)  # the holder stays, whatever the speed of the second start
        held = f"{run} is in use by another run (pid {first.pid} on host {socket.gethostname()}, started "
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        for args, ranks in ((("train", config), 1), (("train", config, "--resume"), 1),
                            (("train", config, "--resume"), 2), (("ref-logps", config), 1)):
            proc = mpo(*args, "--output-dir", run, ranks=ranks, check=False)
            assert proc.returncode == 1 and held in proc.stderr, (args, ranks, proc.stderr[-3000:])
            assert "Traceback" not in proc.stderr or ranks > 1, proc.stderr  # torchrun prints its own on failure
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    mpo("train", config, "--output-dir", run, "--resume")
    assert (run / "checkpoint-6").is_dir() and not list(run.glob(".checkpoint-*.tmp"))


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_leaves_no_temporary_folder(tmp_path, tiny_models, demo_data):
    """A full disk (here a file-size limit) while the ranks write a checkpoint: every rank ends with one line
    naming the file, and no `.checkpoint-<step>.tmp` waits for the next start."""
    import resource

    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 1},
                          deepspeed={"zero_stage": 0}, data={"eval": ""})
    run = tmp_path / "run"
    limit = 800 * 1024  # above the index and reference files, below a checkpoint's optimizer state
    proc = subprocess.run([*launcher(2), "train", str(config), "--output-dir", str(run)],
                          capture_output=True, text=True, env=env(), timeout=900,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    # the ranks share the launcher's stderr: one rank's line may run into the other's
    errors = re.findall(r"mpo train: error: (.*?)(?=mpo train: error: |\n|$)", proc.stderr)
    assert proc.returncode == 1 and len(errors) == 2, proc.stderr[-6000:]
    assert all(f"cannot write {run}/.checkpoint-1.tmp/" in x for x in errors), errors
    assert "[rank" not in proc.stderr, proc.stderr  # no rank's traceback
    assert not list(run.glob(".checkpoint-*")) and not (run / "checkpoint-1").exists()


def each_rank(*args, ranks=2, timeout=300):
    """`mpo ARGS` on `ranks` processes, each on its own (`on_own`). -> [(exit status, output)] by rank."""
    procs = on_own([*launcher(1), *map(str, args)], ranks)
    return [(p.returncode, out) for p, out in ((p, p.communicate(timeout=timeout)[0]) for p in procs)]


@pytest.mark.slow
def test_a_damaged_optimizer_file_on_two_ranks_ends_each_with_one_line(tmp_path, tiny_models, demo_data):
    """A flipped byte (found by the digests) or a damaged header under digests rewritten to match it (found
    by one rank alone, reading its own file): every rank exits 1 with one line naming the file, none aborts,
    none shows a traceback or goes on training."""
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 2},
                          deepspeed={"zero_stage": 0}, checkpoint={"every_steps": 1, "export_final": False},
                          data={"eval": ""})
    run = tmp_path / "run"
    mpo("train", config, "--output-dir", run, ranks=2)
    ckpt = run / "checkpoint-2"
    path = ckpt / "optimizer.rank1.safetensors"
    original, digests = path.read_bytes(), (ckpt / "digests.json").read_text()
    # a byte of tensor data; a letter of a tensor's name in the header, which still parses
    for where, rewrite, named in ((-3, False, f"{path}: damaged"),
                                  (original.index(b"state"), True, f"{path}: lacks the tensor")):
        damaged = bytearray(original)
        damaged[where] ^= 0x10
        path.write_bytes(bytes(damaged))
        if rewrite:
            recorded = json.loads(digests)
            recorded[path.name] = hashlib.sha256(bytes(damaged)).hexdigest()
            (ckpt / "digests.json").write_text(json.dumps(recorded))
        for rank, (status, output) in enumerate(each_rank("train", config, "--output-dir", run, "--resume")):
            said = [x for x in output.splitlines() if x.startswith("mpo")]
            assert status == 1 and len(said) == 1 and named in said[0], (rank, status, output[-4000:])
            assert "Traceback" not in output and "terminate called" not in output, (rank, output[-4000:])
        path.write_bytes(original)
        (ckpt / "digests.json").write_text(digests)
    assert not (run / "checkpoint-3").exists()
