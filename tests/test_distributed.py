"""mpo.distributed's phases, in one process: the watcher thread has ended when a phase has, so no
thread is inside a store call when the process exits (a daemon thread unwound there aborts it)."""

import threading
import time

import torch

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
