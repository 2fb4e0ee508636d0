"""`mpo data check` and `mpo data stats`: validate a data source and measure it for a model."""

from __future__ import annotations

from mpo.data.packing import pair_cost
from mpo.data.pipeline import WINDOW, PackingOptions, PipelineCounts, rendered_pairs
from mpo.data.plan import plan_packing
from mpo.data.records import Rejects
from mpo.data.render import Renderer


def check(model_dir, data, opts: PackingOptions, rejects: Rejects) -> dict:
    """Read and render every pair (strict rejects stop at the first bad one)."""
    renderer = Renderer(model_dir)
    valid = sum(1 for _ in rendered_pairs(data, renderer, rejects, opts))
    return {"valid": valid, "rejected": dict(rejects.counts)}


def stats(model_dir, data, opts: PackingOptions, rejects: Rejects) -> dict:
    """Pairs, tokens, image tiles, rows and packing efficiency per layout, prefix-sharing savings.

    Rows are planned as `mpo logps` plans them (data order, windows of WINDOW pairs); both
    layouts' costs are taken on the pairs as fitted to opts.layout's budget."""
    renderer = Renderer(model_dir)
    n = prompt = chosen = rejected = tiles = 0
    costs = {"prefix": [], "plain": []}
    counts = PipelineCounts()
    for pair in rendered_pairs(data, renderer, rejects, opts, counts):
        n += 1
        prompt += len(pair.prompt_ids)
        chosen += len(pair.chosen_ids)
        rejected += len(pair.rejected_ids)
        tiles += pair.tiles
        for layout, values in costs.items():
            values.append(pair_cost(pair, layout))
    packing = {}
    for layout, values in costs.items():
        fitting = [c for c in values if c <= opts.max_tokens]
        rows = len(plan_packing(fitting, opts.max_tokens, seed=None, window=WINDOW)) if fitting else 0
        packing[layout] = {"row_tokens": sum(values), "rows": rows,
                           "efficiency": round(sum(fitting) / (rows * opts.max_tokens), 4) if rows else None,
                           "pairs_over_budget": len(values) - len(fitting)}
    saved = sum(costs["plain"]) - sum(costs["prefix"])
    return {
        "pairs": n, "rejected": dict(rejects.counts), "truncated": counts.truncated,
        "tokens": {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        "image_tiles": tiles, "max_tokens": opts.max_tokens, "packing": packing,
        "prefix_saves_tokens": saved,
        "prefix_saves_fraction": round(saved / sum(costs["plain"]), 4) if n else 0.0,
    }
