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
