"""Per-sequence sums of per-token log-probs (chosen 2i, rejected 2i + 1), deterministic."""

from __future__ import annotations

import torch

from mpo.kernels.reference import segment_sums
from mpo.logprobs import check_sequences


class _SegmentSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logps, rows, row_seq, seg_offsets):
        ctx.save_for_backward(rows, row_seq)
        ctx.shape, ctx.dtype = token_logps.shape, token_logps.dtype
        return segment_sums(token_logps[rows], seg_offsets)

    @staticmethod
    def backward(ctx, grad_sums):
        rows, row_seq = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_sums.device)
        grad[rows] = grad_sums[row_seq].to(ctx.dtype)
        return grad, None, None, None


def sequence_logps(token_logps: torch.Tensor, seq_ids: torch.Tensor,
                   num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum token log-probs per sequence -> (sums [num_seqs] fp32, counts [num_seqs] int64).

    seq_ids (int, same shape as token_logps): k >= 0 names the sequence a token's target belongs
    to, -1 = not counted. Differentiable in token_logps. Sums are taken in float64 in a fixed
    order, so they are reproducible on any device (no scatter atomics).
    """
    if tuple(seq_ids.shape) != tuple(token_logps.shape) or seq_ids.dtype.is_floating_point:
        raise ValueError(f"seq_ids must be an integer tensor shaped like token_logps "
                         f"{tuple(token_logps.shape)}, got {tuple(seq_ids.shape)} {seq_ids.dtype}")
    if not token_logps.dtype.is_floating_point:
        raise ValueError(f"token_logps must be floating point, got {token_logps.dtype}")
    values, seq = token_logps.reshape(-1), seq_ids.reshape(-1).to(token_logps.device)
    counted = (seq >= 0).nonzero().squeeze(1)
    row_seq, order = torch.sort(seq[counted], stable=True)
    check_sequences(row_seq, num_seqs)
    counts = torch.bincount(row_seq, minlength=num_seqs)
    seg_offsets = torch.zeros(num_seqs + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(counts, 0, out=seg_offsets[1:])
    return _SegmentSums.apply(values, counted[order], row_seq, seg_offsets), counts
