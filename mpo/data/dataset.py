"""Indexed pairs as packed rows, rendered by loader worker processes while the model computes.

`PairDataset` is a map-style torch Dataset whose items are rows: a tuple of pair numbers becomes
one `PackedBatch` (the empty tuple: a blank row). Records are read back from the index's
locations and rendered in full (pixels included) where the item is made, so with
`num_workers` > 0 the rendering runs in worker processes, `prefetch_factor` rows each ahead of the
step. The rows come from a sampler the caller owns (the training plan, the data-order rows), so
the rows and their order do not depend on the worker count; the DataLoader hands results back in
sampler order. A pair that renders differently than when it was indexed (the data or the
processor changed under the same name) is an error naming its record, never a silent mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mpo.data.formats import DataSource
from mpo.data.index import (
    IndexPart,
    PairIndex,
    build_index,
    fingerprint,
    image_options,
    index_key,
    index_path,
    measure,
    merge,
    part_path,
    rendering_options,
)
from mpo.data.packing import IGNORE, PackedBatch, PackingOptions, as_position_ids, fit_to_budget, pack_row
from mpo.data.plan import plan_packing
from mpo.data.records import Rejects
from mpo.data.render import ImageOptions, RenderedPair, Renderer
from mpo.errors import BadPair, DataError

WINDOW = 64  # pairs per first-fit-decreasing window when rows are planned in data order


def blank_row(position_rows: int = 1) -> PackedBatch:
    """A one-token row without pairs: keeps a rank's forward/backward count equal to the others'
    when it has fewer rows this step (ZeRO gathers parameters collectively)."""
    zero = torch.zeros((1, 1), dtype=torch.long)  # token 0, document 0, the shared branch
    return PackedBatch(input_ids=zero, position_ids=as_position_ids(torch.zeros((position_rows, 1), dtype=torch.long)),
                       labels=torch.full((1, 1), IGNORE),
                       seq_ids=torch.full((1, 1), -1), doc_ids=zero, branch_ids=zero,
                       cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), pixel_values=None,
                       pair_index=torch.zeros(0, dtype=torch.long), layout="plain")


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, source: DataSource, index: PairIndex, model_dir, opts: PackingOptions):
        self.source, self.index, self.opts = source, index, opts
        self.model_dir, self.rendering = str(model_dir), index.key["rendering"]
        self.costs = index.cost(opts.layout)
        self._renderer = None  # made where it is first used (each worker its own)

    @classmethod
    def open(cls, model_dir, data: str | Path | DataSource, opts: PackingOptions, rejects: Rejects, *,
             images: ImageOptions | None = None, index_dir=None, workers: int = 0, group=None) -> PairDataset:
        """The pairs of `data` (a path, or a DataSource with its reading options) for this model and
        rendering: the matching index in `index_dir`, or one built now (in `workers` processes) and
        saved there when `index_dir` is given.

        `group`: the ranks of a run building it together (`mpo.distributed.Phase`: `rank`,
        `world`, `share(value)` = rank 0's value everywhere, `sync()`). Each measures its share of
        the pairs and writes it beside the index; rank 0 merges the parts, lists the rejects and
        writes the index (the same bytes as one builder's), and every rank then loads it, so the
        index folder must be one every node shares."""
        rendering = rendering_options(opts, images or ImageOptions())
        source = data if isinstance(data, DataSource) else DataSource(data)
        if group is None or group.world == 1:
            key = index_key(model_dir, data, rendering)
            path = index_path(index_dir, key) if index_dir else None
            index = PairIndex.load(path, key, strict=rejects.strict) if path else None
            if index is None:
                index = build_index(source, model_dir, rendering, rejects, key, workers=workers)
                if path:
                    index.save(path)
            return cls(source, index, model_dir, opts)
        if index_dir is None:
            raise ValueError("building a pair index on several ranks needs an index folder they share")
        main = group.rank == 0
        key = group.share(index_key(model_dir, data, rendering) if main else None)  # rank 0 reads the files
        path = index_path(index_dir, key)
        if not group.share(main and PairIndex.load(path, key, strict=rejects.strict) is not None):
            part = measure(source, model_dir, rendering, shard=(group.rank, group.world), strict=rejects.strict,
                           workers=workers)
            if not main:
                part.save(part_path(path, group.rank, group.world))
            group.sync()
            if main:
                parts = [part_path(path, r, group.world) for r in range(1, group.world)]
                merge([part, *map(IndexPart.load, parts)], part.locations, key, rejects).save(path)
                for p in path.parent.glob(part_path(path, "*", "*").name):  # a failed build's too
                    p.unlink()
            group.sync()
        index = PairIndex.load(path, key, strict=True)  # rank 0 found it whole or wrote it: damage here stops
        if index is None:
            raise FileNotFoundError(f"{path}: rank 0 wrote this pair index but rank {group.rank} cannot read it; "
                                    "the index folder (the run folder or data.index_dir) must be on a file system "
                                    "every node shares")
        return cls(source, index, model_dir, opts)

    @property
    def valid(self) -> np.ndarray:
        return self.index.valid

    @property
    def rejected(self) -> dict:
        return self.index.rejected

    def chosen_tokens(self, pairs) -> int:
        return int(self.index.chosen[np.asarray(pairs, dtype=np.int64)].sum())

    def __getstate__(self):
        return {**self.__dict__, "_renderer": None}

    def read(self, i: int):
        """Pair i's record, read back from its location."""
        return self.source.read(self.index.location(i))

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            self._renderer = Renderer(self.model_dir, image_options(self.rendering))
        return self._renderer

    def render_pair(self, pair, i: int) -> RenderedPair:
        """Pair i rendered in full (BadPair if it cannot be), checked against its index entry."""
        rendered = fit_to_budget(self.renderer.render(pair, i), self.opts.layout, self.opts.max_tokens,
                                 self.opts.overlong)
        if fingerprint(rendered) != int(self.index.arrays["fingerprint"][i]):
            raise DataError(f"{pair.source}: the pair renders differently than when the data was indexed "
                            "(the data, the images or the processor changed): index it again")
        return rendered

    def render(self, i: int) -> RenderedPair:
        pair = self.read(i)
        try:
            return self.render_pair(pair, i)
        except BadPair as bad:  # e.g. an image whose header reads but whose pixels do not decode
            raise DataError(f"{pair.source}: {bad} (indexing reads image headers only; `mpo data check` decodes "
                            "every image and lists such records)") from None

    def __getitem__(self, row: tuple[int, ...]) -> PackedBatch:
        family = self.renderer.family
        if not row:
            return blank_row(family.position_rows)
        return pack_row([self.render(i) for i in row], self.opts.layout, family.positions)

    def data_order_rows(self, window: int = WINDOW) -> list[tuple[int, ...]]:
        """All valid pairs in rows, in data order (evaluation, the reference pass)."""
        rows, valid = [], self.valid.tolist()
        for lo in range(0, len(valid), window):
            chunk = valid[lo:lo + window]
            planned = plan_packing(self.costs[chunk].tolist(), self.opts.max_tokens, seed=None, window=window)
            rows += [tuple(chunk[k] for k in sorted(row)) for row in planned]
        return rows

    def deal(self, rows: list, world: int) -> list[list[tuple[int, ...]]]:
        """Rows to ranks: longest first, each onto the rank with the fewest tokens so far."""
        cost = lambda row: int(self.costs[list(row)].sum())
        load, out = [0] * world, [[] for _ in range(world)]
        for row in sorted(rows, key=cost, reverse=True):
            r = min(range(world), key=lambda k: (load[k], k))
            out[r].append(tuple(row))
            load[r] += cost(row)
        return out

    def loader(self, rows: Iterable[tuple[int, ...]], *, num_workers: int = 0, prefetch_factor: int = 2,
               pin_memory: bool = False, persistent: bool = False) -> torch.utils.data.DataLoader:
        """Packed rows in the order `rows` yields them (an iterable read once, lazily)."""
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent} if num_workers else {}
        return torch.utils.data.DataLoader(self, batch_size=None, sampler=_Rows(rows), num_workers=num_workers,
                                           collate_fn=_as_is, pin_memory=pin_memory, **extra)


class _Rows(torch.utils.data.Sampler):
    def __init__(self, rows: Iterable):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def _as_is(batch):
    return batch
