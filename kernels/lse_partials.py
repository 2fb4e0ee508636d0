"""Forward pass of the fused LM head: per-row partial log-sum-exp over vocabulary splits.

For the M compacted rows (targets not ignored) and the vocabulary cut into S splits of whole
BLOCK_V tiles, program (split s, row block) computes, without ever writing a logit,

    part_m[s, m] = max_{v in s} z[m, v]
    part_s[s, m] = sum_{v in s} exp(z[m, v] - part_m[s, m])        (online, fp32)
    tgt[m]       = z[m, target[m]]     written only by the split holding target[m]

with z from `logit_tile` (matmul + bias, softcap, temperature). `lse_merge` then combines the S
partials in split order, so the result is deterministic. Splitting V gives a grid of
(row blocks x S) programs even when M is small (a reference pass over few response tokens).
Program ids run over row blocks fastest: the programs in flight share the same W tiles, which
stream through L2 once per wave instead of once per row block.
Masking: vocabulary columns past V are set to -inf before the max and the sum; rows past M load
zeros and are not stored.
"""

import torch
import triton
import triton.language as tl

from .config import TileConfig
from .logit_tile import logit_tile


@triton.jit
def _lse_partials_kernel(
    H, W, B, ROWS, TGT, PART_M, PART_S, TGT_LOGIT,
    M, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    temperature, softcap, TILES_PER_SPLIT,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(M, BLOCK_M)
    split = pid // n_row_blocks
    offs_m = (pid % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = tl.load(ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
    tgt = tl.load(TGT + offs_m, mask=row_ok, other=-1)

    tile_lo = split * TILES_PER_SPLIT
    tile_hi = tl.minimum(tile_lo + TILES_PER_SPLIT, tl.cdiv(V, BLOCK_V))
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z, _ = logit_tile(
            H, W, B, rows, row_ok, offs_v, v_ok, D,
            stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )
        t_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        # Every tile holds at least one valid column, so m_new is finite and the rescale of the
        # first tile is exp(-inf) = 0, never inf - inf.
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new

    tl.store(PART_M + split * M + offs_m, m_i, mask=row_ok)
    tl.store(PART_S + split * M + offs_m, s_i, mask=row_ok)
    in_split = (tgt >= tile_lo * BLOCK_V) & (tgt < tile_hi * BLOCK_V)
    tl.store(TGT_LOGIT + offs_m, t_i, mask=row_ok & in_split)


def lse_partials(hidden, weight, bias, rows, targets, *, temperature, softcap, cfg: TileConfig,
                 upcast: bool, dot_precision: str):
    """Launch the forward tiles for compacted `rows` (int64 [M]) with `targets` [M].

    Returns (part_m [S, M], part_s [S, M], target_logit [M]), all fp32.
    """
    M, D = rows.numel(), hidden.shape[1]
    V = weight.shape[0]
    n_row_blocks = triton.cdiv(M, cfg.block_m)
    n_tiles = triton.cdiv(V, cfg.block_v)
    # Enough splits to fill the GPU, but each keeps several tiles so the partials stay small.
    splits = max(1, min(n_tiles, cfg.target_programs // max(n_row_blocks, 1)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)

    part_m = torch.empty((splits, M), dtype=torch.float32, device=hidden.device)
    part_s = torch.empty_like(part_m)
    target_logit = torch.empty((M,), dtype=torch.float32, device=hidden.device)
    if M == 0:
        return part_m, part_s, target_logit
    _lse_partials_kernel[(n_row_blocks * splits,)](
        hidden, weight, bias if bias is not None else hidden, rows, targets,
        part_m, part_s, target_logit,
        M, V, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(temperature), float(softcap or 1.0), tiles_per_split,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=upcast,
        DOT_PRECISION=dot_precision,
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part_m, part_s, target_logit
