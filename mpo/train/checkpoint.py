"""Resumable checkpoints and the final from_pretrained export, written atomically.

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
final/ is a transformers save_pretrained folder (safetensors, parameters gathered from ZeRO-3)
with the tokenizer and processor files of the original model folder; a LoRA run's adapters are
merged into it and also saved alone in peft's layout under final/adapter/. (With LoRA the
trainable weights, and so the checkpoints, are the adapters only.) A QLoRA run's 4-bit base is
dequantized first: final/ is the merged model in the training dtype.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from mpo.atomic import save_atomic
from mpo.models.loading import lm_head
from mpo.models.lora import merged, save_adapter
from mpo.models.quantized import is_4bit
from mpo.train.distributed import Dist, all_gather_objects, barrier
from mpo.train.state import load_state, save_state

MODEL_FILES = re.compile(r"(model.*\.safetensors|pytorch_model.*\.bin|.*\.safetensors\.index\.json|config\.json|"
                         r"generation_config\.json)$")


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
        if not path.is_file():
            damaged.append(f"{path}: missing")
        elif _sha256(path) != recorded[name]:
            damaged.append(f"{path}: damaged (its SHA-256 is not the one recorded when it was written)")
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


def save(engine, run_dir: Path, step: int, trainer_state: dict, dist: Dist, *, zero_stage: int, keep_last: int) -> Path:
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_state(engine.optimizer.state_dict(), tmp / f"optimizer.rank{dist.rank}")
    rng_tensors, rng_plain = _rng_state()
    save_state({"tensors": rng_tensors, "plain": rng_plain}, tmp / f"rng.rank{dist.rank}")
    if dist.main:
        if zero_stage < 3:
            trainable = {n: p.detach().cpu().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
            save_atomic(trainable, tmp / "model.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    barrier()
    names = sorted(p.name for p in tmp.iterdir())
    digests = {n: h for rank in all_gather_objects({n: _sha256(tmp / n) for n in _mine(names, dist)})
               for n, h in rank.items()}
    if dist.main:
        (tmp / "digests.json").write_text(json.dumps(digests, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def load(engine, ckpt: Path, dist: Dist, *, zero_stage: int) -> dict:
    """Restore optimizer (and, below ZeRO-3, the weights) and RNG; returns trainer.json's state."""
    state = json.loads((ckpt / "trainer.json").read_text())
    if state.get("world_size") != dist.world:
        raise ValueError(f"{ckpt} was written by {state.get('world_size')} ranks; resuming needs the same number "
                         f"(this run has {dist.world})")
    if zero_stage < 3:
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / "model.safetensors"))
        missing = engine.module.load_state_dict(weights, strict=False).missing_keys
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        if trainable & set(missing):
            lacking = sorted(trainable & set(missing))[:3]
            raise ValueError(f"{ckpt}: model.safetensors lacks trainable weights {lacking}")
    live = engine.optimizer.state_dict()
    if "load_from_fp32_weights" in inspect.signature(engine.optimizer.load_state_dict).parameters:
        # ZeRO 1-3 and DeepSpeed's bf16 optimizer take every rank's state (and merge fp32 partitions)
        states = [load_state(ckpt / f"optimizer.rank{r}", live) for r in range(dist.world)]
        engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:  # torch optimizers and DeepSpeed's fp16 wrappers: this rank's own state
        engine.optimizer.load_state_dict(load_state(ckpt / f"optimizer.rank{dist.rank}", live))
    rng = load_state(ckpt / f"rng.rank{dist.rank}")
    _set_rng_state(rng["tensors"], rng["plain"])
    return state


def export_final(engine, source_dir: Path, run_dir: Path, dist: Dist, *, zero_stage: int) -> Path:
    """run_dir/final: the trained model as a from_pretrained folder, with its processor files."""
    import deepspeed

    model = engine.module.model
    if is_4bit(model):  # QLoRA: merge into, and export, the dequantized base in the training dtype
        model.dequantize(dtype=lm_head(model).weight.dtype)
    state = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
            if dist.main:
                state[name] = param.detach().cpu().clone()
    # persistent buffers only: a non-persistent one (rotary `inv_freq`, `original_inv_freq`) is rebuilt
    # by the model and would load as an unexpected key
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if dist.main and name in persistent:
            state[name] = buffer.detach().cpu().clone()
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    lora = getattr(engine.module, "lora", None)
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # LoRA: the adapters folded into the base weights, and kept apart in final/adapter
            model.save_pretrained(tmp, state_dict=merged(state, lora.lora_alpha / lora.r) if lora else state,
                                  safe_serialization=True)
            if lora:
                save_adapter(lora, state, tmp / "adapter", str(source_dir.resolve()))
        except SafetensorError as e:  # it names no file
            raise OSError(f"cannot write {tmp}: {e}") from None
        for f in source_dir.iterdir():
            if f.is_file() and not MODEL_FILES.match(f.name):
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier()
    return final
