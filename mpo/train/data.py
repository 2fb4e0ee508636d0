"""Training data: every pair rendered once for its row cost, and a deterministic plan per step.

All ranks read the records (same order, same numbering as `mpo logps`); each renders its shard
(pairs i with i % world == rank) to learn every pair's row cost, scored token counts and
fingerprint, and the shards are all-gathered. Rank 0 writes what was learnt to an index in the
run folder, keyed by the data files, the tokenizer and processor files and the rendering options,
so a resumed run (or `mpo train` after `mpo ref-logps`) does not render everything again. Pairs that fail to render are rejected once, on the
rank that rendered them (counted on every rank after the gather).

Step s of epoch e = s // steps_per_epoch takes the next `global_batch_pairs` pairs of a seeded
permutation of the valid pairs (seed + e); they are packed into rows by first-fit-decreasing
(seeded by seed and s), and the rows are dealt to ranks longest first onto the least-loaded rank.
The plan is a pure function of (seed, step): that is what makes a resumed run see exactly the
data an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpo.atomic import save_atomic
from mpo.data.formats import read_pairs
from mpo.data.packing import IGNORE, PackedBatch, fit_to_budget, pack_row, pair_cost
from mpo.data.pipeline import PackingOptions
from mpo.data.plan import plan_packing
from mpo.data.records import BadPair, DataError, Rejects
from mpo.data.render import Renderer
from mpo.pair_logps import fingerprint
from mpo.train.distributed import Dist, all_gather_objects, barrier


@dataclass(frozen=True)
class PairInfo:
    cost: int  # row tokens in the packing layout
    chosen_tokens: int
    rejected_tokens: int
    fingerprint: int


class PairSet:
    """The pairs of one data source, rendered once for their costs (sharded over ranks)."""

    def __init__(self, path: str, renderer: Renderer, opts: PackingOptions, rejects: Rejects, dist: Dist,
                 index: Path | None = None, key: dict | None = None):
        self.path, self.renderer, self.opts, self.key = path, renderer, opts, key
        # every rank reads every record; only rank 0 reports the ones rejected while reading
        before = Counter(rejects.counts)
        self.records = list(read_pairs(path, rejects if dist.main else Rejects(strict=rejects.strict)))
        if index is not None and self._load_index(index, key):
            return
        self._render_all(rejects, before, dist)
        if index is not None and dist.main:
            self._save_index(index, key)
        barrier()

    def _render_all(self, rejects: Rejects, before: Counter, dist: Dist) -> None:
        mine, error = {}, None
        for i in range(dist.rank, len(self.records), dist.world):
            try:
                pair = self.render(i)
            except BadPair as bad:
                try:
                    rejects.add(self.records[i].source, bad)
                except DataError as e:  # strict: stop every rank, not just this one
                    error = str(e)
                    break
                continue
            mine[i] = PairInfo(pair_cost(pair, self.opts.layout), len(pair.chosen_ids), len(pair.rejected_ids),
                               fingerprint(pair))
        gathered = all_gather_objects((mine, error, dict(Counter(rejects.counts) - before)))
        errors = [e for _, e, _ in gathered if e]
        if errors:
            raise DataError(errors[0])
        self.info: dict[int, PairInfo] = {}
        self.rejected: dict[str, int] = {}
        for part, _, counts in gathered:
            self.info.update(part)
            for reason, n in counts.items():
                self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.valid = sorted(self.info)
        if not self.valid:
            raise ValueError(f"{self.path}: no valid preference pairs (rejected: {self.rejected or 'none'})")

    def _save_index(self, path: Path, key: dict) -> None:
        """Every pair's costs, token counts and fingerprint, so a resumed run need not render again."""
        rows = torch.tensor([[i, *dataclasses.astuple(self.info[i])] for i in self.valid], dtype=torch.int64)
        save_atomic({"pairs": rows}, path, {"key": json.dumps(key, sort_keys=True), "records": str(len(self.records)),
                                            "rejected": json.dumps(self.rejected)})

    def _load_index(self, path: Path, key: dict) -> bool:
        """Take the index when it was made from these records the same way (else render again)."""
        from safetensors import safe_open

        if not path.is_file():
            return False
        with safe_open(str(path), "pt") as f:
            meta, rows = f.metadata(), f.get_tensor("pairs")
        if meta.get("key") != json.dumps(key, sort_keys=True) or meta.get("records") != str(len(self.records)):
            return False
        self.info = {int(r[0]): PairInfo(*map(int, r[1:])) for r in rows}
        self.rejected = json.loads(meta["rejected"])
        self.valid = sorted(self.info)
        return bool(self.valid)

    def render(self, index: int):
        pair = self.renderer.render(self.records[index], index)
        return fit_to_budget(pair, self.opts.layout, self.opts.max_tokens, self.opts.overlong)

    def pack(self, indices: list[int]) -> PackedBatch:
        return pack_row([self.render(i) for i in indices], self.opts.layout)

    def chosen_tokens(self, indices) -> int:
        return sum(self.info[i].chosen_tokens for i in indices)

    def data_order_rows(self, window: int = 64) -> list[list[int]]:
        """All valid pairs in rows, in data order (evaluation, the reference pass)."""
        rows = []
        for lo in range(0, len(self.valid), window):
            chunk = self.valid[lo:lo + window]
            planned = plan_packing([self.info[i].cost for i in chunk], self.opts.max_tokens, seed=None, window=window)
            rows += [[chunk[k] for k in sorted(row)] for row in planned]
        return rows

    def deal(self, rows: list[list[int]], world: int) -> list[list[list[int]]]:
        """Rows to ranks: longest first, each onto the rank with the fewest tokens so far."""
        cost = lambda row: sum(self.info[i].cost for i in row)
        load, out = [0] * world, [[] for _ in range(world)]
        for row in sorted(rows, key=cost, reverse=True):
            r = min(range(world), key=lambda k: (load[k], k))
            out[r].append(row)
            load[r] += cost(row)
        return out


class TrainPlan:
    """Which pairs each step trains on, and how they are packed and dealt to ranks."""

    def __init__(self, pairs: PairSet, *, seed: int, global_batch_pairs: int, window: int):
        self.pairs, self.seed, self.window = pairs, seed, window
        self.batch = min(global_batch_pairs, len(pairs.valid))
        self.steps_per_epoch = math.ceil(len(pairs.valid) / self.batch)

    def step_pairs(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs.valid))
        return [self.pairs.valid[j] for j in order[k * self.batch:(k + 1) * self.batch]]

    def rows(self, step: int, world: int) -> tuple[list[int], list[list[list[int]]]]:
        """(the step's pairs, per-rank rows of pair indices)."""
        chosen = self.step_pairs(step)
        planned = plan_packing([self.pairs.info[i].cost for i in chosen], self.pairs.opts.max_tokens,
                               seed=random.Random(f"{self.seed}:{step}").randrange(2**63),
                               window=min(self.window, len(chosen)))
        return chosen, self.pairs.deal([[chosen[k] for k in row] for row in planned], world)


def blank_row() -> PackedBatch:
    """A one-token row without pairs: keeps a rank's forward/backward count equal to the others'
    when it has fewer rows this step (ZeRO gathers parameters collectively)."""
    one = torch.zeros((1, 1), dtype=torch.long)
    return PackedBatch(input_ids=one, position_ids=one, labels=torch.full((1, 1), IGNORE),
                       seq_ids=torch.full((1, 1), -1), doc_ids=one, branch_ids=one,
                       cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), pixel_values=None,
                       pair_index=torch.zeros(0, dtype=torch.long), layout="plain")
