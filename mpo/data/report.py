"""`mpo data check` and `mpo data stats`: validate a data source and measure it for a model.

Both go through the pair index (built, or taken from `index_dir`); `check` also renders every
indexed pair in full, so images whose header reads but whose pixels do not decode are found too."""

from __future__ import annotations

import numpy as np

from mpo.data.dataset import WINDOW, PairDataset
from mpo.data.packing import PackingOptions
from mpo.data.plan import plan_packing
from mpo.data.records import Rejects
from mpo.data.render import ImageOptions
from mpo.errors import BadPair


def check(model_dir, data, opts: PackingOptions, rejects: Rejects, *, images: ImageOptions | None = None,
          index_dir=None, workers: int = 0) -> dict:
    """Index and render every pair (strict rejects stop at the first bad one)."""
    pairs = PairDataset.open(model_dir, data, opts, rejects, images=images, index_dir=index_dir, workers=workers)
    rejected = dict(pairs.rejected)
    valid = 0
    for i in pairs.valid.tolist():
        pair = pairs.read(i)
        try:
            pairs.render_pair(pair, i)
            valid += 1
        except BadPair as bad:
            rejects.add(pair.source, bad)
            rejected[bad.reason] = rejected.get(bad.reason, 0) + 1
    return {"valid": valid, "rejected": rejected}


def stats(model_dir, data, opts: PackingOptions, rejects: Rejects, *, images: ImageOptions | None = None,
          index_dir=None, workers: int = 0) -> dict:
    """Pairs, tokens, image tiles, rows and packing efficiency per layout, prefix-sharing savings.

    Rows are planned as `mpo logps` plans them (data order, windows of WINDOW pairs); both
    layouts' costs are taken on the pairs as fitted to opts.layout's budget."""
    pairs = PairDataset.open(model_dir, data, opts, rejects, images=images, index_dir=index_dir, workers=workers)
    a, valid = pairs.index.arrays, pairs.valid
    total = lambda name: int(a[name][valid].astype(np.int64).sum())
    costs = {layout: pairs.index.cost(layout)[valid] for layout in ("prefix", "plain")}
    packing = {}
    for layout, values in costs.items():
        fitting = values[values <= opts.max_tokens].tolist()
        rows = len(plan_packing(fitting, opts.max_tokens, seed=None, window=WINDOW)) if fitting else 0
        packing[layout] = {"row_tokens": int(values.sum()), "rows": rows,
                           "efficiency": round(sum(fitting) / (rows * opts.max_tokens), 4) if rows else None,
                           "pairs_over_budget": len(values) - len(fitting)}
    plain = int(costs["plain"].sum())
    saved = plain - int(costs["prefix"].sum())
    return {
        "pairs": len(valid), "rejected": pairs.rejected, "truncated": pairs.index.truncated,
        "tokens": {"prompt": total("prompt"), "chosen": total("chosen"), "rejected": total("rejected")},
        "image_tiles": total("tiles"), "max_tokens": opts.max_tokens, "packing": packing,
        "prefix_saves_tokens": saved, "prefix_saves_fraction": round(saved / plain, 4) if len(valid) else 0.0,
    }
