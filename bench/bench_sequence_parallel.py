"""Activation memory per rank of one long packed row, unsplit (1 rank) and split by sequence
parallelism (train.sequence_parallel_size N: Ulysses over N ranks), on the CPU over gloo.

    python bench/bench_sequence_parallel.py [--tokens 16384 --sp 1,2 --hidden 256 --layers 2]

A random Llama-shaped text model; one prefix-packed row of 16 pairs (about --tokens tokens);
forward through the packed attention (under Ulysses when N > 1), the fused MPO loss on this rank's
tokens with the per-sequence sums added over the group, backward. Measured per rank: the bytes
autograd keeps for backward (every tensor saved in the forward, each storage counted once, the
weights not: the activations), apart from the [row x row] attention masks the CPU's SDPA keeps (every rank attends
over the whole row, so they do not shrink with N; the GPU backends, flash-attn and FlexAttention,
keep none), the peak RSS of the process, and the wall time of forward + backward. Prints a table
and one JSON line per N.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from ranks import report, run_workers

PAIRS = 16


def row(tokens: int, vocab: int):
    """A prefix-packed row of PAIRS pairs, each prompt : chosen : rejected about 1 : 2 : 1."""
    from mpo.data.packing import pack_row
    from mpo.data.render import RenderedPair

    g = torch.Generator().manual_seed(0)
    per = tokens // PAIRS
    prompt, chosen = per // 4, per // 2
    rejected = per - prompt - chosen + 1  # prefix layout: P + C + R - 1 tokens a pair
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    pairs = [RenderedPair(ids(prompt), ids(chosen), ids(rejected), None, index=k) for k in range(PAIRS)]
    return pack_row(pairs, "prefix")


def worker(a) -> dict:
    from mpo.distributed import init
    from mpo.losses import RewardShift
    from mpo.models import sequence_parallel
    from mpo.models.loading import lm_head, load_model, scored_hidden_states
    from mpo.mpo_loss import MPOLoss

    dist = init("cpu")
    shard = sequence_parallel.enable(a.model, a.size, dist) if a.size > 1 else None
    model = load_model(a.model, dtype=torch.float32)
    batch = row(a.tokens, model.config.vocab_size)
    loss_fn = MPOLoss(update_shift=False, reward_shift=RewardShift("none"), impl="torch",
                      sequence_group=None if shard is None else shard.group)
    saved: dict[int, int] = {}
    masks: dict[int, int] = {}
    padded = batch.num_tokens + (-batch.num_tokens % a.size)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() in weights:
            return t
        whole_row = t.dim() >= 2 and tuple(t.shape[-2:]) == (padded, padded)
        (masks if whole_row else saved)[storage.data_ptr()] = storage.nbytes()
        return t

    zeros = torch.zeros(batch.num_pairs)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden, labels, seq_ids = scored_hidden_states(model, batch, shard=shard)
        head = lm_head(model)
        loss, _ = loss_fn(hidden, head.weight, labels, seq_ids, zeros, zeros, head.bias)
    activations, mask_bytes = sum(saved.values()), sum(masks.values())
    loss.backward()
    seconds = time.perf_counter() - start
    return {"sequence_parallel_size": a.size, "rank": dist.rank, "row_tokens": batch.num_tokens,
            "rank_tokens": hidden.shape[0], "activation_bytes": activations, "sdpa_mask_bytes": mask_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "forward_backward_s": round(seconds, 2), "loss": round(float(loss), 6)}


def build_model(folder: Path, a) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=a.tokens + 64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--sp", default="1,2", help="sequence-parallel sizes to measure (one run each)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        report([worker(a)])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", a)
        for size in map(int, a.sp.split(",")):
            results += run_workers(__file__, size, ["--model", str(model), "--size", str(size),
                                                    "--tokens", str(a.tokens)])
    print(f"{'N':>3} {'rank':>4} {'row tokens':>10} {'rank tokens':>11} {'activations MB':>14} "
          f"{'SDPA masks MB':>13} {'peak RSS MB':>11} {'fwd+bwd s':>9}")
    for r in sorted(results, key=lambda r: (r["sequence_parallel_size"], r["rank"])):
        print(f"{r['sequence_parallel_size']:>3} {r['rank']:>4} {r['row_tokens']:>10} {r['rank_tokens']:>11} "
              f"{r['activation_bytes'] / 2**20:>14.1f} {r['sdpa_mask_bytes'] / 2**20:>13.1f} "
              f"{r['peak_rss_bytes'] / 2**20:>11.0f} {r['forward_backward_s']:>9}")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
