"""Per-pair chosen/rejected log-prob sums of a dataset under a model: the reference pass.

Forward only, over packed rows in data order, through the fused LM-head kernel
(`mpo.linear_sequence_logps`). `mpo logps` and the trainer's reference cache run the same pass over
the same rows (a `PairDataset`: the pair index and its loader) and write the same safetensors
layout, indexed by pair number (see mpo.data.index for the numbering):
  chosen_logps, rejected_logps   float32 [pairs]  (NaN where the pair was rejected)
  chosen_tokens, rejected_tokens int64 [pairs]    (scored tokens; 0 where rejected)
  valid                          bool [pairs]
  fingerprint                    int64 [pairs]    (a hash of the pair's rendered token ids, 0 where
                                 rejected: lets a consumer check it reads the same pairs)
and string metadata (data, pairs, rejected counts, rendering options, and the caller's: the model,
or the reference cache's key). It is written to a temporary file and renamed, so a crash never
leaves a half-written file behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mpo.atomic import save_atomic
from mpo.data.dataset import PairDataset
from mpo.data.packing import PackingOptions
from mpo.data.records import Rejects
from mpo.data.render import ImageOptions
from mpo.models.loading import load_model, pair_logps


def run_pass(pairs: PairDataset, rows: list[tuple[int, ...]], sums: Callable, device, dtype, loader_options: dict,
             progress: Callable | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(pair numbers, sums, token counts) of each row, `sums(batch)` giving a row's (sums, counts)."""
    results, done, tokens = [], 0, 0
    for batch in pairs.loader(rows, **loader_options):
        values, counts = sums(batch.to(device, dtype))
        results.append((batch.pair_index.cpu(), values.cpu(), counts.cpu()))
        done, tokens = done + batch.num_pairs, tokens + batch.num_tokens
        if progress is not None:
            progress(done, tokens)
    return results


def save_pair_logps(pairs: PairDataset, results, out: Path, metadata: dict) -> None:
    n = len(pairs.index)
    tensors = {"chosen_logps": torch.full((n,), float("nan")), "rejected_logps": torch.full((n,), float("nan")),
               "chosen_tokens": torch.zeros(n, dtype=torch.int64), "rejected_tokens": torch.zeros(n, dtype=torch.int64)}
    for index, sums, counts in results:
        tensors["chosen_logps"][index], tensors["rejected_logps"][index] = sums[0::2].float(), sums[1::2].float()
        tensors["chosen_tokens"][index], tensors["rejected_tokens"][index] = counts[0::2], counts[1::2]
    tensors["valid"] = ~torch.isnan(tensors["chosen_logps"])
    tensors["fingerprint"] = torch.from_numpy(pairs.index.arrays["fingerprint"].copy())
    save_atomic(tensors, Path(out), {"data": str(pairs.source.path), "pairs": str(n),
                                     "skipped": json.dumps(pairs.rejected),
                                     "rendering": json.dumps(pairs.index.key["rendering"]), **metadata})


@torch.no_grad()
def compute_pair_logps(model_dir, data, out: Path, opts: PackingOptions, rejects: Rejects, *,
                       dtype=torch.float32, device="cpu", images: ImageOptions | None = None, index_dir=None,
                       workers: int = 0, progress=None) -> dict:
    """Run the reference pass over `data` and write `out`; returns a summary dict. The pair index
    is taken from (or saved to) `index_dir` when given."""
    start = time.perf_counter()
    pairs = PairDataset.open(model_dir, data, opts, rejects, images=images, index_dir=index_dir, workers=workers)
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    results = run_pass(pairs, pairs.data_order_rows(), lambda batch: pair_logps(model, batch), device, None,
                       {"num_workers": workers}, progress)
    save_pair_logps(pairs, results, out, {"model": str(Path(model_dir).resolve())})
    return {"pairs": len(pairs.index), "valid": len(pairs.valid), "skipped": pairs.rejected,
            "truncated": pairs.index.truncated, "row_tokens": int(pairs.costs[pairs.valid].sum()),
            "seconds": round(time.perf_counter() - start, 3)}
