"""One process owns a run folder: an advisory lock on `<run>/.lock`, held by rank 0 for the run's life.

Two `mpo train` (or `mpo ref-logps`) processes on one folder would interleave their metrics, alternate
their checkpoints and delete each other's half-written ones; a job re-submitted while the first still
runs does exactly that. The second start is refused, naming the holder (pid, host, start time, which
the holder writes into the file). The kernel drops the lock whenever the holder ends, SIGKILL included,
so a `--resume` after a killed run needs no clean-up; the stale file's contents mean nothing then.

The lock is a POSIX record lock (`fcntl.lockf`), not `flock`: it is the kind network file systems
carry across nodes (NFS v3 through NLM, NFS v4 in the protocol itself, Lustre mounted with `-o flock`,
GPFS), where `flock` was node-local on NFS before Linux 2.6.12 and is an emulation on top of it since.
On NFS v4 the server keeps a dead node's lock until its lease runs out (90 s by default): a resume on
another node right after the holder's node died may be refused until then. NFS mounted with `nolock`
and Lustre with `-o localflock` lock on one node only. A file system that refuses locks (Lustre
mounted without `flock` answers ENOSYS, some FUSE file systems ENOLCK or EOPNOTSUPP) gets a warning
and an unprotected run, not a refusal: a guard against a second start must not make the trainer
unusable there.

POSIX locks belong to the process, not the file descriptor: another descriptor of the same file opened
and closed in this process would drop the lock, and a second lock taken through one would not conflict.
So this process never opens a locked folder's file twice: a second lock on it is refused from here.
Forked children (data loader workers) do not inherit the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

# the lock files this process holds; a lock dropped without close() leaves with its (closed) file
_held: weakref.WeakValueDictionary[Path, RunLock] = weakref.WeakValueDictionary()
_HELD_ELSEWHERE = (errno.EACCES, errno.EAGAIN)  # lockf's answers when another process holds the lock


class RunLock:
    """Take `run_dir`'s lock (creating the folder) or raise ValueError naming the folder and its holder.
    Released by `close()`, at the end of a `with` block, or when the process ends."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = (run_dir / ".lock").resolve()
        if self.path in _held:
            raise ValueError(f"{run_dir} is in use by this process (pid {os.getpid()}, host {socket.gethostname()}); "
                             "one run folder takes one run at a time")
        # opened without truncating: until the lock is taken, the holder's record must stay readable
        self._file = open(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _HELD_ELSEWHERE:
                holder = self._holder()
                self._file.close()
                raise ValueError(f"{run_dir} is in use by another run ({holder}); one run folder takes one run "
                                 "at a time: wait for it to end, stop it, or choose another --output-dir") from None
            print(f"mpo: warning: {run_dir}: the file system does not lock files ({e.strerror}); nothing stops a "
                  "second run from using this folder at the same time", file=sys.stderr, flush=True)
        _held[self.path] = self
        self._file.truncate(0)
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        self._file.flush()

    def _holder(self) -> str:
        try:
            record = json.loads(self._file.read())
            return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            # the holder has taken the lock but not yet written its record
            return "pid and host not recorded yet"

    def close(self) -> None:
        if not self._file.closed:
            _held.pop(self.path, None)
            self._file.close()  # closing the descriptor releases the lock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
