"""Forward epilogue: merge the split partials into log-probs, and optionally sequence sums.

    lse[m]  = max_s part_m[s, m] + log(sum_s part_s[s, m] * exp(part_m[s, m] - max))
    logp[m] = target_logit[m] - lse[m]

Each program owns a contiguous range of compacted rows and walks it in BLOCK steps:
- token mode: range = one row block; logp is scattered to out[rows[m]] (the caller zeroed `out`,
  so ignored positions read 0).
- segment mode: range = one sequence (rows were sorted by sequence id, offsets[k]..offsets[k+1]);
  logp is summed in fp32 in a fixed order, so sums[k] is deterministic without atomics. This is
  the chosen/rejected reduction fused into the forward's last pass: per-token log-probs are never
  written.
lse is stored for the backward in both modes. Splits are merged in index order (deterministic).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_merge_kernel(
    PART_M, PART_S, TGT_LOGIT, LSE, ROWS, OUT, SEG_OFFSETS, SUMS,
    M, N_SPLITS,
    SEGMENTED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if SEGMENTED:
        start = tl.load(SEG_OFFSETS + pid)
        end = tl.load(SEG_OFFSETS + pid + 1)
    else:
        start = pid * BLOCK
        end = tl.minimum(start + BLOCK, M)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        ok = offs < end
        m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(N_SPLITS):
            m_k = tl.load(PART_M + k * M + offs, mask=ok, other=0.0)
            s_k = tl.load(PART_S + k * M + offs, mask=ok, other=0.0)
            m_new = tl.maximum(m, m_k)
            s = s * tl.exp(m - m_new) + s_k * tl.exp(m_k - m_new)
            m = m_new
        lse = m + tl.log(tl.where(ok, s, 1.0))  # masked lanes have s = 0
        logp = tl.load(TGT_LOGIT + offs, mask=ok, other=0.0) - lse
        tl.store(LSE + offs, lse, mask=ok)
        if SEGMENTED:
            total += tl.where(ok, logp, 0.0)
        else:
            rows = tl.load(ROWS + offs, mask=ok, other=0).to(tl.int64)
            tl.store(OUT + rows, logp, mask=ok)
    if SEGMENTED:
        tl.store(SUMS + pid, tl.sum(total, axis=0))


def lse_merge(part_m, part_s, target_logit, rows, *, out=None, seg_offsets=None, block: int = 256):
    """Token mode (`out` given, fp32 [N] zeroed) or segment mode (`seg_offsets` int64 [S + 1]).

    Returns (lse [M], sums [S] or None).
    """
    assert (out is None) != (seg_offsets is None)
    n_splits, M = part_m.shape
    lse = torch.empty((M,), dtype=torch.float32, device=part_m.device)
    if seg_offsets is not None:
        n_programs = seg_offsets.numel() - 1
        sums = torch.empty((n_programs,), dtype=torch.float32, device=part_m.device)
    else:
        n_programs = triton.cdiv(M, block)
        sums = None
    if n_programs == 0:
        return lse, sums
    dummy = part_m
    _lse_merge_kernel[(n_programs,)](
        part_m, part_s, target_logit, lse, rows,
        out if out is not None else dummy,
        seg_offsets if seg_offsets is not None else rows,
        sums if sums is not None else dummy,
        M, n_splits,
        SEGMENTED=seg_offsets is not None, BLOCK=block,
    )
    return lse, sums
