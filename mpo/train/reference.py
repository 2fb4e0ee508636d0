"""Reference log-probs: computed once into a cache, or online by a frozen second model.

The cache (`mpo ref-logps CONFIG`, or automatically at train start) holds per-pair chosen and
rejected sums of the reference model in data order, in the `mpo logps` file layout, plus the
pairs' fingerprints and a key: content hashes of the reference model's files and of the data
files, and the rendering options (packing, row budget, over-long policy, tile budget). A cache
whose key or fingerprints differ from the run's is refused, naming what changed, so training
never silently uses reference values of other pairs. Images are not hashed (there may be
millions); a changed image under an unchanged path goes unnoticed.

Under ZeRO-3 the reference is a DeepSpeed inference engine with partitioned parameters (its LM-
head weight gathered around the fused kernel); otherwise a replica on each rank. Building the
cache deals rows to ranks and pads them with blank rows so every rank runs the same forwards.

Online with LoRA, when only the adapters train and the reference is the policy's own base model,
no second model is loaded: `BaseReference` runs the policy with its adapters disabled (the base
weights never change, so that is the initial policy), forward-only on the same packed row and
fused kernel path. Every rank runs it on every micro-batch, as it runs the policy's forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mpo.atomic import save_atomic
from mpo.data.dataset import PairDataset
from mpo.data.index import tree_digest
from mpo.distributed import Dist, Phase
from mpo.models.loading import load_model, pair_logps
from mpo.models.lora import adapters_disabled
from mpo.models.moe import leaf_blocks
from mpo.models.reference_pass import run_pass, save_pair_logps
from mpo.models.sequence_parallel import Shard
from mpo.train.config import Config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".txt", ".model", ".tiktoken")


def cache_key(reference_model: str, data_digest: str, rendering: dict) -> dict:
    model_dir = Path(reference_model)
    model_files = [p for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return {"reference_model": tree_digest(model_files), "data": data_digest, "rendering": rendering}


class ReferenceModel:
    """A frozen model giving per-sequence log-prob sums of packed rows."""

    def __init__(self, path: str, *, dtype: torch.dtype, dist: Dist, zero_stage: int, attention: str,
                 ds_config: dict, impl: str = "auto", load_in_4bit: bool = False, shard: Shard | None = None):
        self.attention, self.zero3, self.impl, self.shard = attention, zero_stage == 3, impl, shard
        if self.zero3:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            keep_alive = HfDeepSpeedConfig(config)  # from_pretrained partitions while it lives
            model = load_model(path, dtype=dtype)
            del keep_alive
            for p in model.parameters():
                p.requires_grad_(False)
            leaf_blocks(model)
            self.model = deepspeed.initialize(model=model, config=config)[0].module
        else:
            self.model = load_model(path, dtype=dtype, device=dist.device, load_in_4bit=load_in_4bit)
            self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def sums(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logps(self.model, batch, backend=self.attention, impl=self.impl, zero3=self.zero3,
                          shard=self.shard)


def base_is_reference(cfg: Config) -> bool:
    """LoRA trains nothing but adapters and the reference is the policy's base model: the policy
    with its adapters disabled is the reference. (Modules trained in full beside the adapters,
    `lora.modules_to_save`, change the base, so they need a reference of their own.)"""
    reference = cfg.loss.reference_model
    same = not reference or Path(reference).resolve() == Path(cfg.model.path).resolve()
    return cfg.lora.r > 0 and not cfg.lora.modules_to_save and same


class BaseReference:
    """The reference as the LoRA policy's own base: the policy model, adapters disabled, in eval mode
    (as a loaded reference runs; a LoRA layer's dropout is then off as well), no gradients. Each
    module's train / eval mode is put back afterwards."""

    def __init__(self, model, *, zero_stage: int, attention: str, impl: str = "auto", shard: Shard | None = None):
        self.model, self.zero3, self.attention, self.impl, self.shard = model, zero_stage == 3, attention, impl, shard

    @torch.no_grad()
    def sums(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return pair_logps(self.model, batch, backend=self.attention, impl=self.impl, zero3=self.zero3,
                                  shard=self.shard)
        finally:
            for m, mode in modes.items():
                m.training = mode


PART = ("pairs", "sums", "counts")  # a rank's run_pass results, its rows concatenated


def build_cache(pairs: PairDataset, reference: ReferenceModel, key: dict, out: Path, dist: Dist, dtype,
                loader_options: dict, phase: Phase, *, data: tuple[int, int] | None = None) -> None:
    """Run the reference over every valid pair (rows dealt to data ranks, blank rows padding the
    short ones) and write `out` on rank 0, in the `mpo logps` layout. Each other data rank leaves
    its sums beside `out` and the ranks meet through the `phase` they are in: a pass of many hours
    may end on one rank long after another, longer than a collective would wait. data: (this
    rank's data rank, data ranks) under sequence parallelism, where the first rank of each group
    writes the group's sums; default (rank, world)."""
    from safetensors.torch import load_file

    rank, world = data or (dist.rank, dist.world)
    dealt = pairs.deal(pairs.data_order_rows(), world)
    mine = dealt[rank]
    rows = [mine[k] if k < len(mine) else () for k in range(max(len(r) for r in dealt))]
    results = run_pass(pairs, rows, reference.sums, dist.device, dtype, loader_options)
    parts = [out.with_name(f"{out.name}.part-{r}-of-{world}") for r in range(world)]
    writes = dist.rank == rank * (dist.world // world)  # a group's first rank
    if not dist.main and writes:
        save_atomic(dict(zip(PART, map(torch.cat, zip(*results, strict=True)), strict=True)), parts[rank])
    phase.sync()
    if dist.main:
        for path in parts[1:]:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: a rank wrote its reference sums here but rank 0 cannot read "
                                        "them; the cache folder must be on a file system every node shares")
            results.append(tuple(load_file(str(path))[name] for name in PART))
        save_pair_logps(pairs, results, out, {"key": json.dumps(key, sort_keys=True)})
        for path in parts[1:]:
            path.unlink()
    phase.sync()


def load_cache(path: Path, key: dict, pairs: PairDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference sums indexed by pair number; refuses a cache that does not match."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved = json.loads(f.metadata().get("key", "{}"))
        tensors = {k: f.get_tensor(k) for k in ("chosen_logps", "rejected_logps", "fingerprint")}
    changed = [part for part in ("reference_model", "data", "rendering") if saved.get(part) != key[part]]
    if changed:
        raise ValueError(f"reference cache {path} does not match this run: the {', '.join(changed)} changed "
                         f"since it was made. Delete it (it is rebuilt at train start) or set loss.reference_cache")
    prints, want = tensors["fingerprint"].numpy(), pairs.index.arrays["fingerprint"]
    if prints.shape != want.shape:
        raise ValueError(f"reference cache {path} does not match this run: it holds {prints.size} pairs, the data "
                         f"has {want.size}. Delete it or set loss.reference_cache")
    stale = pairs.valid[prints[pairs.valid] != want[pairs.valid]]
    if len(stale):
        first = pairs.source.read(pairs.index.location(int(stale[0]))).source
        raise ValueError(f"reference cache {path} does not match this run: {len(stale)} pairs render differently "
                         f"(first: {first}). Delete it or set loss.reference_cache")
    return tensors["chosen_logps"], tensors["rejected_logps"]
