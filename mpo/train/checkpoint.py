"""Resumable checkpoints, written atomically.

checkpoint-<step>/ holds everything an exact resume needs:
  optimizer.rank<r>.{safetensors,json}  each rank's optimizer state (for ZeRO: its partition,
                                        with the fp32 master weights)
  model.safetensors                     the trainable weights (ZeRO stages 0-2; under ZeRO-3 the
                                        fp32 master partitions in the optimizer state restore them)
  rng.rank<r>.{safetensors,json}        torch (CPU and CUDA), Python and NumPy RNG states
  trainer.json                          step, scheduler, reward shift, counters
  digests.json                          the SHA-256 of every other file, checked before a resume reads any
Everything is written into .checkpoint-<step>.tmp and renamed when complete, so a killed run
never leaves a half-written checkpoint behind; the oldest checkpoints beyond `keep_last` are
removed. Frozen weights are not stored: they are those of the model folder the run starts from.
With LoRA the trainable weights, and so the checkpoints, are the adapters only. The final
from_pretrained export (final/) is `mpo.train.export`'s.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mpo.atomic import save_atomic
from mpo.distributed import Dist, Phase, all_gather_objects, barrier
from mpo.train.state import load_state, read_tensors, save_state


def remove_partial(run_dir: Path) -> None:
    """Remove what a killed run left half-written (`.checkpoint-<step>.tmp`, `.final.tmp`)."""
    for tmp in [*run_dir.glob(".checkpoint-*.tmp"), run_dir / ".final.tmp"]:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _mine(names, dist: Dist) -> list[str]:
    """The files this rank hashes: its own `*.rank<r>.*`, and on rank 0 the shared ones too (so the
    ranks share the hashing of a sharded optimizer state)."""
    return [n for n in names if f".rank{dist.rank}." in n or (dist.main and ".rank" not in n)]


def verify(ckpt: Path, dist: Dist) -> None:
    """Refuse a checkpoint any file of which differs from what was written (flipped bytes, a truncated
    or missing file), naming the file, before anything reads it."""
    listed = ckpt / "digests.json"
    try:
        recorded = json.loads(listed.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{listed}: unreadable ({e}); the checkpoint cannot be verified") from None
    damaged = []
    for name in _mine(sorted(recorded), dist):
        path = ckpt / name
        try:
            if _sha256(path) != recorded[name]:
                damaged.append(f"{path}: damaged (its SHA-256 is not the one recorded when it was written)")
        except FileNotFoundError:
            damaged.append(f"{path}: missing")
        except OSError as e:  # listed like the damage, so that this rank still reaches the others' gather
            damaged.append(f"{path}: unreadable ({e.strerror})")
    damaged = sorted(x for rank in all_gather_objects(damaged) for x in rank)
    if damaged:
        earlier = [p.name for p in checkpoints(ckpt.parent) if p != ckpt]
        advice = (f"move {ckpt.name} away to resume from {earlier[-1]}" if earlier else
                  "no earlier checkpoint to resume from")
        raise ValueError("; ".join(damaged) + f". Not resuming from it: {advice}")


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _together(work, tmp: Path, dist: Dist) -> list:
    """-> every rank's `work()`; the ranks' meeting point. A write that fails on any rank (an OSError:
    a full disk, a file-size limit) fails on every rank, so none is left waiting for one that stopped,
    and rank 0 first removes the half-written folder (before the others end: a launcher such as
    torchrun stops the remaining ranks as soon as one exits)."""
    error = result = None
    try:
        result = work()
    except OSError as e:
        error = e
    outcomes = all_gather_objects((None if error is None else str(error), result))
    failed = [f"rank {r}: {message}" if dist.world > 1 else message
              for r, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise error if error is not None else OSError(failed[0])
    return [r for _, r in outcomes]


def save(engine, run_dir: Path, step: int, trainer_state: dict, dist: Dist, *, zero_stage: int, keep_last: int) -> Path:
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"

    def start():
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write() -> dict[str, str]:
        """This rank's files; -> their digests (and on rank 0 those of the shared files)."""
        save_state(optimizer_state, tmp / f"optimizer.rank{dist.rank}")
        rng_tensors, rng_plain = _rng_state()
        save_state({"tensors": rng_tensors, "plain": rng_plain}, tmp / f"rng.rank{dist.rank}")
        if dist.main:
            if zero_stage < 3:
                trainable = {n: p.detach().cpu().clone() for n, p in engine.module.named_parameters()
                             if p.requires_grad}
                save_atomic(trainable, tmp / "model.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        # the files this rank wrote, by name: the folder also holds other ranks' files being written
        # (and their writers' temporary names)
        written = [f"{stem}.{ext}" for stem in (f"optimizer.rank{dist.rank}", f"rng.rank{dist.rank}")
                   for ext in ("safetensors", "json")]
        if dist.main:
            written += ["model.safetensors"] * (zero_stage < 3) + ["trainer.json"]
        return {n: _sha256(tmp / n) for n in written}

    def finish(digests: dict[str, str]):
        if dist.main:
            (tmp / "digests.json").write_text(json.dumps(digests, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old)

    optimizer_state = engine.optimizer.state_dict()
    _together(start, tmp, dist)
    digests = {n: h for rank in _together(write, tmp, dist) for n, h in rank.items()}
    _together(lambda: finish(digests), tmp, dist)
    return final


class RankStates(Sequence):
    """Every rank's optimizer state as DeepSpeed's ZeRO `load_state_dict` wants it (a list indexed by
    data-parallel rank), read from disk only when indexed. For the checkpoints written here (rigid:
    the same ranks and partition layout) DeepSpeed reads only this rank's entry, so a rank reads
    its own files alone; the whole list would be world x one rank's state in every process (about
    96 GB a rank at 8B). DeepSpeed indexes other ranks only to re-partition: an elastic checkpoint
    (ZeRO 1-2 `elastic_checkpoint`) or one saved without parameter-alignment paddings
    (`_restore_elastic_base_optimizer_state`, `_restore_from_unpadded_fp32_weights`); there it
    reads them one at a time through this sequence."""

    def __init__(self, ckpt: Path, world: int, live):
        self.ckpt, self.world, self.live = ckpt, world, live

    def __len__(self) -> int:
        return self.world

    def __getitem__(self, rank: int):
        if not 0 <= rank < self.world:
            raise IndexError(rank)
        return load_state(self.ckpt / f"optimizer.rank{rank}", self.live)


def load(engine, ckpt: Path, dist: Dist, *, zero_stage: int) -> dict:
    """Restore optimizer (and, below ZeRO-3, the weights) and RNG; returns trainer.json's state.
    Each rank reads its own files, which only it may find unreadable (a damaged header under digests
    rewritten to match it): a phase, so that such a failure ends every rank instead of leaving the
    others in DeepSpeed's collectives or training on alone."""
    with Phase(dist, f"reading {ckpt}"):
        return _load(engine, ckpt, dist, zero_stage=zero_stage)


def _load(engine, ckpt: Path, dist: Dist, *, zero_stage: int) -> dict:
    state = json.loads((ckpt / "trainer.json").read_text())
    if state.get("world_size") != dist.world:
        raise ValueError(f"{ckpt} was written by {state.get('world_size')} ranks; resuming needs the same number "
                         f"(this run has {dist.world})")
    if zero_stage < 3:
        weights = read_tensors(ckpt / "model.safetensors")
        missing = engine.module.load_state_dict(weights, strict=False).missing_keys
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        if trainable & set(missing):
            lacking = sorted(trainable & set(missing))[:3]
            raise ValueError(f"{ckpt}: model.safetensors lacks trainable weights {lacking}")
    live = engine.optimizer.state_dict()
    if "load_from_fp32_weights" in inspect.signature(engine.optimizer.load_state_dict).parameters:
        # ZeRO 1-3 and DeepSpeed's bf16 optimizer take a list with every rank's state
        states = RankStates(ckpt, dist.world, live)
        engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:  # torch optimizers and DeepSpeed's fp16 wrappers: this rank's own state
        engine.optimizer.load_state_dict(load_state(ckpt / f"optimizer.rank{dist.rank}", live))
    rng = load_state(ckpt / f"rng.rank{dist.rank}")
    _set_rng_state(rng["tensors"], rng["plain"])
    return state
