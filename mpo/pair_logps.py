"""Per-pair chosen/rejected log-prob sums of a dataset under a model: the reference pass.

Forward only, over packed rows, through the fused LM-head kernel (`mpo.linear_sequence_logps`).
The output safetensors file holds, in data order (see mpo.data.pipeline for the numbering):
  chosen_logps, rejected_logps  float32 [pairs]  (NaN where the pair was skipped)
  chosen_tokens, rejected_tokens int64 [pairs]  (scored tokens; 0 where skipped)
  valid                          bool [pairs]
  fingerprint                    int64 [pairs]  (a hash of the pair's rendered token ids, 0 where
                                 skipped: lets a consumer check it reads the same pairs)
and string metadata (model, data, packing, max_tokens, pairs, skipped counts). It is written to a
temporary file and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mpo.atomic import save_atomic
from mpo.data.index import fingerprint
from mpo.data.pipeline import WINDOW, PackingOptions, PipelineCounts, packed_rows, rendered_pairs
from mpo.data.records import Rejects
from mpo.data.render import Renderer
from mpo.models.loading import load_model, pair_logps


@torch.no_grad()
def compute_pair_logps(model_dir, data, out: Path, opts: PackingOptions, rejects: Rejects, *,
                       dtype=torch.float32, device="cpu", window: int = WINDOW, progress=None) -> dict:
    """Run the reference pass and write `out`; returns a summary dict."""
    renderer = Renderer(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    chosen, rejected, c_tok, r_tok, prints = [], [], [], [], {}
    seen, start, tokens = PipelineCounts(), time.perf_counter(), 0

    def fingerprinted(pairs):
        for pair in pairs:
            prints[pair.index] = fingerprint(pair)
            yield pair

    pairs = fingerprinted(rendered_pairs(data, renderer, rejects, opts, seen))
    for batch in packed_rows(pairs, opts, window=window):
        sums, counts = pair_logps(model, batch.to(device))
        for values, part in ((chosen, sums[0::2]), (rejected, sums[1::2]), (c_tok, counts[0::2]),
                             (r_tok, counts[1::2])):
            values.append((batch.pair_index, part.cpu()))
        tokens += batch.num_tokens
        if progress is not None:
            progress(seen.read, tokens)
    n = seen.read

    def scatter(parts, fill, dtype):
        full = torch.full((n,), fill, dtype=dtype)
        for index, values in parts:
            full[index] = values.to(dtype)
        return full

    chosen_logps = scatter(chosen, float("nan"), torch.float32)
    tensors = {
        "chosen_logps": chosen_logps,
        "rejected_logps": scatter(rejected, float("nan"), torch.float32),
        "chosen_tokens": scatter(c_tok, 0, torch.int64),
        "rejected_tokens": scatter(r_tok, 0, torch.int64),
        "valid": ~torch.isnan(chosen_logps),
        "fingerprint": torch.zeros(n, dtype=torch.int64),
    }
    for index, value in prints.items():
        tensors["fingerprint"][index] = value
    summary = {"pairs": n, "valid": int(tensors["valid"].sum()), "skipped": dict(rejects.counts),
               "truncated": seen.truncated, "row_tokens": tokens,
               "seconds": round(time.perf_counter() - start, 3)}
    metadata = {"model": str(Path(model_dir).resolve()), "data": str(Path(data).resolve()),
                "packing": opts.layout, "max_tokens": str(opts.max_tokens), "overlong": opts.overlong,
                "pairs": str(n), "skipped": json.dumps(dict(rejects.counts))}
    save_atomic(tensors, Path(out), metadata)
    return summary
