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
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from mpo.logprobs import linear_sequence_logps
from mpo.models.loading import lm_head, load_model, logit_softcap, packed_hidden_states
from mpo.atomic import save_atomic
from mpo.train.data import PairSet, blank_row
from mpo.train.distributed import Dist, all_gather_objects, barrier

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".txt", ".model", ".tiktoken")


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(paths: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(paths):
        h.update(f"{p.name}:{_file_digest(p)};".encode())
    return h.hexdigest()


def data_files(path: Path) -> list[Path]:
    """The files a data source is read from (MMPR meta + annotations, or the file / folder)."""
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    if path.suffix == ".json":
        from mpo.data.formats import _resolve

        meta = json.loads(path.read_text())
        return [path] + [_resolve(path.parent, entry["annotation"]) for entry in meta.values()]
    return [path]


def cache_key(reference_model: str, data_digest: str, rendering: dict) -> dict:
    model_dir = Path(reference_model)
    model_files = [p for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return {"reference_model": _tree_digest(model_files), "data": data_digest, "rendering": rendering}


def pairs_key(model: str, data: str, rendering: dict) -> dict:
    """What rendering pairs depends on: the data files, the tokenizer and processor files (not the
    weights) and the rendering options."""
    files = [p for p in Path(model).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
             and p.suffix not in (".safetensors", ".bin")]
    return {"data": _tree_digest(data_files(Path(data))), "processing": _tree_digest(files), "rendering": rendering}


class ReferenceModel:
    """A frozen model giving per-sequence log-prob sums of packed rows."""

    def __init__(self, path: str, *, dtype: torch.dtype, dist: Dist, zero_stage: int, attention: str,
                 ds_config: dict, impl: str = "auto"):
        self.attention, self.zero3, self.impl = attention, zero_stage == 3, impl
        if self.zero3:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            keep_alive = HfDeepSpeedConfig(config)  # from_pretrained partitions while it lives
            model = load_model(path, dtype=dtype)
            del keep_alive
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = deepspeed.initialize(model=model, config=config)[0].module
        else:
            self.model = load_model(path, dtype=dtype, device=dist.device)
            self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def sums(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = packed_hidden_states(self.model, batch, backend=self.attention)
        head = lm_head(self.model)
        params = [p for p in (head.weight, head.bias) if p is not None]
        gather = nullcontext()
        if self.zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params)
        with gather:
            return linear_sequence_logps(hidden, head.weight, batch.labels[0], batch.seq_ids[0], 2 * batch.num_pairs,
                                         head.bias, softcap=logit_softcap(self.model), impl=self.impl)


def build_cache(pairs: PairSet, reference: ReferenceModel, key: dict, out: Path, dist: Dist, dtype) -> None:
    """Run the reference over every valid pair (rows dealt to ranks) and write `out` on rank 0."""
    dealt = pairs.deal(pairs.data_order_rows(), dist.world)
    mine, rounds = dealt[dist.rank], max(len(rows) for rows in dealt)
    results = []
    for k in range(rounds):
        batch = (pairs.pack(mine[k]) if k < len(mine) else blank_row()).to(dist.device, dtype)
        sums, counts = reference.sums(batch)
        results.append((batch.pair_index.tolist(), sums.cpu(), counts.cpu()))
    gathered = all_gather_objects(results)
    if dist.main:
        n = len(pairs.records)
        tensors = {"chosen_logps": torch.full((n,), float("nan")), "rejected_logps": torch.full((n,), float("nan")),
                   "chosen_tokens": torch.zeros(n, dtype=torch.int64), "rejected_tokens": torch.zeros(n, dtype=torch.int64),
                   "fingerprint": torch.zeros(n, dtype=torch.int64)}
        for part in gathered:
            for index, sums, counts in part:
                for k, i in enumerate(index):
                    tensors["chosen_logps"][i], tensors["rejected_logps"][i] = sums[2 * k], sums[2 * k + 1]
                    tensors["chosen_tokens"][i], tensors["rejected_tokens"][i] = counts[2 * k], counts[2 * k + 1]
        for i in pairs.valid:
            tensors["fingerprint"][i] = pairs.info[i].fingerprint
        tensors["valid"] = ~torch.isnan(tensors["chosen_logps"])
        save_atomic(tensors, out, {"key": json.dumps(key, sort_keys=True), "data": str(pairs.path),
                                   "pairs": str(n)})
    barrier()


def load_cache(path: Path, key: dict, pairs: PairSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference sums indexed by pair number; refuses a cache that does not match."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved = json.loads(f.metadata().get("key", "{}"))
        tensors = {k: f.get_tensor(k) for k in ("chosen_logps", "rejected_logps", "fingerprint")}
    changed = [part for part in ("reference_model", "data", "rendering") if saved.get(part) != key[part]]
    if changed:
        raise ValueError(f"reference cache {path} does not match this run: the {', '.join(changed)} changed "
                         f"since it was made. Delete it (it is rebuilt at train start) or set loss.reference_cache")
    prints = tensors["fingerprint"]
    stale = [i for i in pairs.valid if i >= prints.numel() or int(prints[i]) != pairs.info[i].fingerprint]
    if stale:
        raise ValueError(f"reference cache {path} does not match this run: {len(stale)} pairs render differently "
                         f"(first: {pairs.records[stale[0]].source}). Delete it or set loss.reference_cache")
    return tensors["chosen_logps"], tensors["rejected_logps"]
