"""Process-group setup for one process without a launcher, torchrun, or the deepspeed launcher.

Launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a bare `mpo train`
gets a one-process group on a free local port. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_choice: str = "auto", *, setting: str = "train.device") -> Dist:
    """Initialise torch.distributed through DeepSpeed (idempotent) and pick this rank's device
    (`setting`: the key or flag `device_choice` came from, for the error)."""
    import deepspeed

    # no launcher: a group of one, described as a launcher would describe it. DeepSpeed reads the
    # environment, not the process group (the engine and zero.Init take LOCAL_RANK from it; its own
    # MPI discovery writes these same variables). A free port of its own: a MASTER_PORT without a
    # RANK is left over from another group (a parent process's), whose store may still hold it.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"{setting} cuda: no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def close() -> None:
    """End this process's group before the interpreter ends: its store and gloo threads (C++) are then
    stopped and joined. Left to the interpreter's exit, they are destroyed in no set order, and a
    thread object destroyed still running aborts the process ("terminate called without an active
    exception", exit status 134), seen after an error on one rank of one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_process(status: int = 0) -> NoReturn:
    """End this process with `status` without the interpreter's teardown: the process group ended
    (`close`), the exit handlers run (logging, W&B, worker processes, file locks) and the output
    flushed first, as at any exit. The `mpo` command ends so, and so should any script run on many
    ranks.

    The teardown frees what module state still holds: torch.distributed.nn's default arguments keep the
    world group when imported after it started, DeepSpeed's module state its groups and, under ZeRO-3,
    the model. Their gloo or NCCL threads, reaching for an interpreter half torn down, then abort the
    process ("terminate called without an active exception", exit status 134) after work that
    succeeded, now and then."""
    close()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def all_sum(values: list[float], device) -> list[float]:
    """Elementwise sum over ranks, in float64 (counts and metric sums)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()


class _GroupSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # this rank's part only: every rank backpropagates the same loss


def group_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise sum over `group`; differentiable, the gradient flowing to this rank's own part."""
    return _GroupSum.apply(x, group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, group):
        sizes = [x.new_zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([keep], device=x.device), group=group)
        counts = [int(n) for n in sizes]
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[:keep] = x[:keep]
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.rows, ctx.first, ctx.keep = group, x.shape[0], sum(counts[:dist.get_rank(group)]), keep
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's gradient for every row, summed
        mine = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        mine[:ctx.keep] = grad[ctx.first:ctx.first + ctx.keep]
        return mine, None, None


def gather_rows(x: torch.Tensor, keep: int, group) -> torch.Tensor:
    """The first `keep` rows of each rank's `x` (any number per rank), one after another in rank order,
    on every rank of `group`; differentiable: each rank's rows get the group's summed gradient for them
    (the rows past `keep` a gradient of zero, so whatever made them still runs its backward)."""
    return _GatherRows.apply(x, keep, group)


# --- phases: long stretches of work that fail together ---------------------------------------------------------

_phases = 0  # phases entered by this process; every rank enters the same phases in the same order


def _store():
    """A client of the process group's key-value store of its own (the launcher's MASTER_ADDR:PORT
    server): phases talk over it, never through a collective, so no collective time limit applies."""
    return dist.distributed_c10d._get_default_store().clone()


class Phase:
    """Work every rank does that may take long or fail on one rank alone (building the pair index,
    the reference cache, the export, training-time answers).

    A collective has a time limit (the process group's, 30 minutes by default) and never hears of a
    peer that raised instead of joining it. Here the ranks meet at `sync()` and at the end by polling
    the store, without a limit: a long preparation cannot time out. A rank that raises inside the
    phase posts its message; a watcher thread on every other rank sees it within a second, prints
    it and ends that process (wherever it is blocked: a poll, a gloo or NCCL collective) with exit
    status 1; the failing rank waits until the others have read the message (the store lives in
    rank 0's process, which for the same reason stays until they have), then raises as usual. A rank
    killed outright posts nothing: its launcher (torchrun) ends the others."""

    POLL_S = 0.2
    ACK_WAIT_S = 30.0
    JOIN_S = 30.0  # a store call answers or fails well within this

    def __init__(self, dist_: Dist, name: str):
        global _phases
        _phases += 1
        self.dist, self.name, self.key = dist_, name, f"mpo/phase/{_phases}"
        self.store = _store() if dist_.world > 1 else None
        self._points, self._done, self._watcher = 0, threading.Event(), None

    def __enter__(self) -> Phase:
        if self.store is not None:
            self._watcher = threading.Thread(target=self._watch, args=(self.store.clone(),), daemon=True,
                                             name=f"mpo phase watcher {self.key}")
            self._watcher.start()
        return self

    def __exit__(self, kind, error, tb) -> bool:
        try:
            if self.store is None:
                return False
            if error is None:
                self.sync()
            else:
                self._post(error)
        finally:
            self._done.set()
            if self._watcher is not None:
                # Joined, not left running: a daemon thread still inside a store call (C++) when the
                # interpreter exits is unwound through code that cannot be, and the process aborts
                # ("terminate called without an active exception", exit status 134).
                self._watcher.join(self.JOIN_S)
        return False

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world

    def sync(self) -> None:
        """Wait until every rank has reached this point (no time limit)."""
        if self.store is None:
            return
        name = self._name("sync")
        self.store.add(name, 1)
        self._poll(lambda: self.store.add(name, 0) == self.dist.world)
        # Rank 0 leaves last, once every rank has seen the count: under a launcher that starts the ranks
        # itself (srun, mpirun) the store lives in rank 0's process, and a rank 0 that ended at once
        # would take it from a rank still polling here.
        if self.dist.main:
            self._poll(lambda: self.store.add(f"{name}/seen", 0) >= self.dist.world - 1)
        else:
            self.store.add(f"{name}/seen", 1)

    def share(self, value):
        """Rank 0's `value` (JSON: tuples come back as lists, on rank 0 too), on every rank."""
        if self.store is None:
            return json.loads(json.dumps(value))
        name = self._name("share")
        if self.dist.main:
            self.store.set(name, json.dumps(value))
        else:
            self._poll(lambda: self.store.check([name]))
        return json.loads(self.store.get(name))

    def _name(self, what: str) -> str:
        self._points += 1
        return f"{self.key}/{what}{self._points}"

    def _poll(self, done) -> None:
        delay = 0.01
        while not done():
            time.sleep(delay)  # a failure elsewhere ends this process from the watcher thread
            delay = min(delay * 2, self.POLL_S)

    def _post(self, error: BaseException) -> None:
        message = f"rank {self.dist.rank}: {type(error).__name__}: {error}"
        if self.store.compare_set(f"{self.key}/error", "", message) != message.encode():
            return  # another rank failed first: its message is the one posted
        self._await_readers(self.store)

    def _await_readers(self, store) -> None:
        """Until every other rank has read the posted failure (bounded): rank 0's process serves the store."""
        deadline = time.monotonic() + self.ACK_WAIT_S
        with contextlib.suppress(RuntimeError):  # the store gone: nobody is left to read
            while store.add(f"{self.key}/read", 0) < self.dist.world - 1 and time.monotonic() < deadline:
                time.sleep(self.POLL_S)

    def _watch(self, store) -> None:
        error = f"{self.key}/error"
        while not self._done.wait(self.POLL_S):
            try:
                if not store.check([error]):
                    continue
                message = store.get(error).decode()
            except RuntimeError:
                # rank 0's process, which serves the store, has ended: after this rank posted its own failure
                # (its main thread reports it), or killed outright (the launcher ends this process)
                return
            if message.startswith(f"rank {self.dist.rank}:"):
                return  # this rank's own failure: it raises in the main thread
            print(f"mpo: {self.name} failed on {message}; stopping rank {self.dist.rank}", file=sys.stderr,
                  flush=True)
            store.add(f"{self.key}/read", 1)
            if self.dist.main:
                self._await_readers(store)
            os._exit(1)
