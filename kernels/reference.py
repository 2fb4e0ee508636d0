"""The same LM-head math in pure PyTorch: the CPU path, and the in-dtype baseline.

Matmuls run in the input dtype (as eager PyTorch would), everything after them in fp32. Rows are
processed in chunks of at most CHUNK_ELEMS logits, so memory stays bounded and [N, V] is never
materialised; the backward recomputes each chunk's logits from the saved log-sum-exp. dW and db
accumulate across row chunks in fp32; dH is written once per row.
Same interface as `lm_head` (the Triton path): compacted `rows`, per-row `targets`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMS = 1 << 24  # 64 MB of fp32 logits per chunk


def _logits(hidden, weight, bias, rows, temperature, softcap):
    a = F.linear(hidden[rows], weight, bias).float()
    t = torch.tanh(a / softcap) if softcap is not None else None
    c = softcap * t if softcap is not None else a
    return c / temperature, t


def _row_chunks(M: int, V: int):
    step = max(1, CHUNK_ELEMS // max(V, 1))
    return [(lo, min(lo + step, M)) for lo in range(0, M, step)]


def segment_sums(values: torch.Tensor, seg_offsets: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive ranges values[offsets[k]:offsets[k+1]], deterministic on any device.

    A float64 running sum differenced at the boundaries: no atomics (unlike index_add_ on CUDA),
    and the cancellation error of the difference stays ~1e-16 relative to the running total.
    """
    run = torch.zeros(values.numel() + 1, dtype=torch.float64, device=values.device)
    torch.cumsum(values.double(), dim=0, out=run[1:])
    return (run[seg_offsets[1:]] - run[seg_offsets[:-1]]).float()


def forward(hidden, weight, bias, rows, targets, *, temperature: float, softcap: float | None,
            out: torch.Tensor | None = None, seg_offsets: torch.Tensor | None = None):
    M, V = rows.numel(), weight.shape[0]
    lse = torch.empty((M,), dtype=torch.float32, device=hidden.device)
    logp = torch.empty((M,), dtype=torch.float32, device=hidden.device)
    for lo, hi in _row_chunks(M, V):
        z, _ = _logits(hidden, weight, bias, rows[lo:hi], temperature, softcap)
        lse[lo:hi] = torch.logsumexp(z, dim=1)
        logp[lo:hi] = z.gather(1, targets[lo:hi, None]).squeeze(1) - lse[lo:hi]
    if out is not None:
        out[rows] = logp
        return lse, None
    return lse, segment_sums(logp, seg_offsets)


def backward(hidden, weight, bias, rows, targets, lse, grad, grad_index, *, temperature: float,
             softcap: float | None, needs: tuple[bool, bool, bool]):
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    M, V = rows.numel(), weight.shape[0]
    g = grad[grad_index].float()
    d_hidden = torch.zeros_like(hidden) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    d_bias = torch.zeros((V,), dtype=torch.float32, device=weight.device) if need_b else None
    for lo, hi in _row_chunks(M, V):
        z, t = _logits(hidden, weight, bias, rows[lo:hi], temperature, softcap)
        dz = torch.exp(z - lse[lo:hi, None]).neg_()
        dz.scatter_add_(1, targets[lo:hi, None], torch.ones_like(dz[:, :1]))
        dz *= (g[lo:hi] / temperature)[:, None]
        if softcap is not None:
            dz *= 1.0 - t * t
        if need_b:
            d_bias += dz.sum(0)
        dz = dz.to(hidden.dtype)
        if need_h:
            d_hidden[rows[lo:hi]] = dz @ weight
        if need_w:
            d_weight += (dz.t() @ hidden[rows[lo:hi]]).float()
    return (
        d_hidden,
        d_weight.to(weight.dtype) if need_w else None,
        d_bias.to(bias.dtype) if need_b else None,
    )
