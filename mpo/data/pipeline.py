"""From a data source to packed rows: read -> render -> fit the row budget -> plan -> pack.

Pairs are numbered in data order as the format readers yield them (records rejected while
reading get no number); a pair rejected later (an unreadable image, too long under the 'drop'
policy) keeps its number, so per-pair outputs stay aligned with the data. `packed_rows` plans
rows window by window in data order, holding at most `window` rendered pairs (and their image
tiles) in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mpo.data.formats import read_pairs
from mpo.data.packing import LAYOUTS, OVERLONG, PackedBatch, fit_to_budget, pack_row, pair_cost
from mpo.data.plan import plan_packing
from mpo.data.records import BadPair, Rejects
from mpo.data.render import RenderedPair, Renderer


@dataclass(frozen=True)
class PackingOptions:
    layout: str = "prefix"
    max_tokens: int = 8192
    overlong: str = "truncate"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"packing must be one of {LAYOUTS}, got {self.layout!r}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"over-long policy must be one of {OVERLONG}, got {self.overlong!r}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")


@dataclass
class PipelineCounts:
    read: int = 0  # pairs numbered so far (rendered or not): the length of per-pair outputs
    truncated: int = 0  # pairs whose responses were cut to fit a row


def rendered_pairs(data, renderer: Renderer, rejects: Rejects, opts: PackingOptions,
                   counts: PipelineCounts | None = None) -> Iterator[RenderedPair]:
    """Valid, budget-fitted rendered pairs, numbered in data order."""
    counts = counts if counts is not None else PipelineCounts()
    for pair in read_pairs(data, rejects):
        index, counts.read = counts.read, counts.read + 1
        try:
            rendered = renderer.render(pair, index)
            fitted = fit_to_budget(rendered, opts.layout, opts.max_tokens, opts.overlong)
        except BadPair as bad:
            rejects.add(pair.source, bad)
            continue
        counts.truncated += fitted is not rendered
        yield fitted


WINDOW = 64  # rendered pairs (with their image tiles) held at once while planning rows


def packed_rows(pairs: Iterator[RenderedPair], opts: PackingOptions, *, window: int = WINDOW) -> Iterator[PackedBatch]:
    """Rows of at most opts.max_tokens tokens, first-fit-decreasing within windows of pairs in
    data order (layout 'none': one pair per row)."""
    buffer: list[RenderedPair] = []

    def flush():
        if opts.layout == "none":
            rows = [[i] for i in range(len(buffer))]
        else:
            rows = plan_packing([pair_cost(p, opts.layout) for p in buffer], opts.max_tokens, seed=None,
                                window=len(buffer))
        for row in rows:
            yield pack_row([buffer[i] for i in sorted(row)], opts.layout)
        buffer.clear()

    for pair in pairs:
        buffer.append(pair)
        if len(buffer) == window:
            yield from flush()
    if buffer:
        yield from flush()
