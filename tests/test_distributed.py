"""mpo.distributed in one process: the phase watcher has ended when its phase has, and an `mpo` command
ends the process group it started, its threads with it, whether it succeeds or fails (a C++ thread
left running at the interpreter's exit aborts the process, exit status 134)."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from commands import write_jsonl

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
