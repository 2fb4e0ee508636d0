"""Backward, step 1: the logit gradient for one vocabulary chunk, recomputed tile by tile.

For compacted row m with upstream gradient g[m] = GRAD[GRAD_IDX[m]] (a token's own gradient, or
its sequence's coefficient broadcast to the tokens of that sequence) and column v of the chunk:

    p       = exp(z[m, v] - lse[m])                      (lse saved by the forward)
    dz[m,v] = g[m] * (onehot(target[m])[v] - p) / temperature * (1 - t^2 if softcap)

The upstream scale is applied here, BEFORE the D- and N-reductions of the gradient matmuls, so an
arbitrary (non-uniform, signed) upstream gradient is exact. dz is stored to a [M, V_CHUNK] scratch
in the input dtype (what the gradient matmuls consume), masked to 0 outside [M] x [V_LO, V_HI).
When the bias needs a gradient (BIAS_GRAD), each row block also writes its fp32 column sums of dz
to DB_PART[row block, :];
the launcher adds those rows in a fixed order (no atomics).
Program ids run over row blocks fastest, so programs in flight share W tiles through L2.
"""

import triton
import triton.language as tl

from .config import TileConfig
from .logit_tile import logit_tile


@triton.jit
def _logits_grad_kernel(
    H, W, B, ROWS, TGT, LSE, GRAD, GRAD_IDX, DZ, DB_PART,
    M, V_LO, V_HI, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dzm, stride_dbr,
    temperature, softcap,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(M, BLOCK_M)
    row_block = pid % n_row_blocks
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_c = (pid // n_row_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk
    offs_v = V_LO + offs_c
    v_ok = offs_v < V_HI
    rows = tl.load(ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
    tgt = tl.load(TGT + offs_m, mask=row_ok, other=-1)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    g_idx = tl.load(GRAD_IDX + offs_m, mask=row_ok, other=0).to(tl.int64)
    g = tl.load(GRAD + g_idx, mask=row_ok, other=0.0).to(tl.float32)

    z, t = logit_tile(
        H, W, B, rows, row_ok, offs_v, v_ok, D,
        stride_hn, stride_hd, stride_wv, stride_wd, temperature, softcap,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    dz = (onehot - tl.exp(z - lse[:, None])) * (g / temperature)[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(row_ok[:, None] & v_ok[None, :], dz, 0.0)

    dz_ptrs = DZ + offs_m.to(tl.int64)[:, None] * stride_dzm + offs_c[None, :]
    tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
    if BIAS_GRAD:
        tl.store(DB_PART + row_block * stride_dbr + offs_c, tl.sum(dz, axis=0), mask=v_ok)


def logits_grad(hidden, weight, bias, rows, targets, lse, grad, grad_index, dz, db_part, *,
                v_lo: int, v_hi: int, temperature, softcap, cfg: TileConfig, upcast: bool,
                dot_precision: str):
    """Fill dz[:, :v_hi - v_lo] (and db_part, when given) for vocabulary [v_lo, v_hi)."""
    M, D = rows.numel(), hidden.shape[1]
    n_row_blocks = triton.cdiv(M, cfg.block_m)
    n_col_tiles = triton.cdiv(v_hi - v_lo, cfg.block_v)
    _logits_grad_kernel[(n_row_blocks * n_col_tiles,)](
        hidden, weight, bias if bias is not None else hidden, rows, targets, lse, grad, grad_index,
        dz, db_part if db_part is not None else lse,
        M, v_lo, v_hi, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
        db_part.stride(0) if db_part is not None else 0,
        float(temperature), float(softcap or 1.0),
        HAS_BIAS=bias is not None, BIAS_GRAD=db_part is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast, DOT_PRECISION=dot_precision,
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def scratch_columns(M: int, itemsize: int, V: int, cfg: TileConfig) -> int:
    """Vocabulary chunk width in whole BLOCK_V tiles: what fits cfg.scratch_bytes, at least
    cfg.min_chunk_cols (and one tile), at most V rounded up to a tile."""
    per_tile = max(M, 1) * cfg.block_v * itemsize
    tiles = max(1, cfg.scratch_bytes // per_tile, triton.cdiv(cfg.min_chunk_cols, cfg.block_v))
    return min(tiles * cfg.block_v, triton.cdiv(V, cfg.block_v) * cfg.block_v)

