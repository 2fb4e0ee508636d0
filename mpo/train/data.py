"""The training plan: which pairs each step trains on, and how they are packed and dealt to ranks.

Step s of epoch e = s // steps_per_epoch takes the next `global_batch_pairs` pairs of a seeded
permutation of the valid pairs (seed + e); they are packed into rows by first-fit-decreasing
(seeded by seed and s), and the rows are dealt to ranks longest first onto the least-loaded rank.
The plan is a pure function of (seed, step): that is what makes a resumed run see exactly the
data an uninterrupted one would, whatever the number of loader workers.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np

from mpo.data.dataset import PairDataset
from mpo.data.plan import plan_packing


class TrainPlan:
    """Which pairs each step trains on, and how they are packed and dealt to ranks."""

    def __init__(self, pairs: PairDataset, *, seed: int, global_batch_pairs: int, window: int):
        self.pairs, self.seed, self.window = pairs, seed, window
        self.batch = min(global_batch_pairs, len(pairs.valid))
        self.steps_per_epoch = math.ceil(len(pairs.valid) / self.batch)
        # the loader (reading ahead) and the step both ask for a step's plan: made once
        self.rows = functools.lru_cache(maxsize=64)(self._rows)

    def step_pairs(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs.valid))
        return self.pairs.valid[order[k * self.batch:(k + 1) * self.batch]].tolist()

    def _rows(self, step: int, world: int) -> tuple[list[int], list[list[tuple[int, ...]]]]:
        """(the step's pairs, per-rank rows of pair indices)."""
        chosen = self.step_pairs(step)
        planned = plan_packing(self.pairs.costs[chosen].tolist(), self.pairs.opts.max_tokens,
                               seed=random.Random(f"{self.seed}:{step}").randrange(2**63),
                               window=min(self.window, len(chosen)))
        return chosen, self.pairs.deal([[chosen[k] for k in row] for row in planned], world)
