"""How processes end: the phase watcher has ended when its phase has; an `mpo` command ends the process
group it started, its threads with it, whether it succeeds or fails; and the `mpo` process ends without
the interpreter's teardown, which aborts a process whose C++ threads (gloo's) still need it (exit
status 134)."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from commands import env, write_jsonl

from mpo import distributed
from mpo.distributed import Dist, Phase


class SlowStore:
    """Every call takes a while, as over the network; every rank has always arrived."""

    def clone(self):
        return self

    def check(self, keys):
        time.sleep(0.3)
        return False

    def add(self, key, amount):
        return 2


def watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mpo phase watcher")]


def test_a_phase_ends_with_its_watcher(monkeypatch):
    monkeypatch.setattr(distributed, "_store", SlowStore)
    for _ in range(3):
        with Phase(Dist(0, 2, 0, torch.device("cpu")), "test"):
            assert len(watchers()) == 1
            time.sleep(0.25)  # the watcher is inside a store call now
        assert watchers() == []


def native_threads() -> set[str]:
    return {(Path(f"/proc/self/task/{t}/comm")).read_text().strip() for t in os.listdir("/proc/self/task")}


@pytest.mark.parametrize("ok", [True, False])
def test_a_command_ends_the_process_group_it_started(tmp_path, tiny_models, ok):
    from mpo.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    assert not torch.distributed.is_initialized()
    args = ["eval", "--model", str(tiny_models["qwen2"]), "--prompts", str(prompts), "--device", "cpu",
            "--max-new-tokens", "2" if ok else "100000", "--out", str(tmp_path / "out")]
    assert main(args) == (0 if ok else 1)
    assert not torch.distributed.is_initialized()
    assert not {n for n in native_threads() if "gloo" in n or "tcpstore" in n}, native_threads()


BUSY_AT_EXIT = """
import atexit, threading, time, torch
import mpo.cli

def busy():  # a thread inside torch's code (the GIL released) when the process ends, as gloo's are
    a = torch.randn(256, 256)
    while True:
        a @ a

def main():
    threading.Thread(target=busy, daemon=True).start()
    time.sleep(0.2)
    atexit.register(print, "the exit handlers ran")
    {end}

mpo.cli.main = main
mpo.cli.run()
"""


@pytest.mark.parametrize(("end", "status", "said"), [
    ("return 3", 3, "the exit handlers ran"),
    ("raise SystemExit(None)", 0, "the exit handlers ran"),
    ("raise SystemExit('mpo: refused')", 1, "mpo: refused"),
    ("raise RuntimeError('unexpected')", 1, "RuntimeError: unexpected"),
])
def test_the_command_ends_without_the_interpreters_teardown(end, status, said):
    """A thread still inside torch when the command ends (gloo's, after a run) does not abort the process:
    the teardown, which would unwind it through code that cannot be unwound, is skipped; the exit
    handlers still run and the status is main's."""
    proc = subprocess.run([sys.executable, "-c", BUSY_AT_EXIT.format(end=end)], capture_output=True, text=True,
                          env=env(), timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == status and said in output, (proc.returncode, output[-3000:])
    assert "terminate called" not in output and "the exit handlers ran" in output, output[-3000:]


class MemoryStore:
    """The c10d store's calls Phase makes, in memory, shared by threads standing in for ranks; rank 1's
    reads of a count take a while, as over a slow network."""

    def __init__(self):
        self.values, self.lock, self.events = {}, threading.Lock(), []

    def clone(self):
        return self

    def add(self, key, amount):
        slow = amount == 0 and threading.current_thread().name == "rank 1"
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount
            value = self.values[key]
        if slow:
            time.sleep(0.3)
            self.events.append(("rank 1 read a count", time.monotonic()))
        return value

    def check(self, keys):
        with self.lock:
            return all(k in self.values for k in keys)


def test_rank_0_leaves_a_sync_after_every_rank_has_seen_it_complete(monkeypatch):
    """Rank 0's process serves the store (under srun or mpirun): it must not end while another rank
    still reads the sync's count from it."""
    store = MemoryStore()
    monkeypatch.setattr(distributed, "_store", lambda: store)

    def rank(r):
        phase = Phase(Dist(r, 2, 0, torch.device("cpu")), "test")
        phase.key = "mpo/phase/test"  # as every rank's own count of phases would name it
        with phase:
            pass
        if r == 0:
            store.events.append(("rank 0 left", time.monotonic()))

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank {r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    left = [when for what, when in store.events if what == "rank 0 left"]
    read = [when for what, when in store.events if what == "rank 1 read a count"]
    assert left and read and left[0] >= max(read), store.events
