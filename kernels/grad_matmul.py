"""Backward, step 2: the gradient matmuls over one vocabulary chunk's dlogits.

    C[c_row(m), n] = sum_k A[m, k] * B[b_row(k), n]  (+ ACC[m, n])

used twice per chunk with strides (no transposed copies):
- dW[v_lo + m, :] = sum_k dz[k, m] * H[rows[k], :]   (A = dz^T, B gathered through `rows`)
- dH_acc[m, :]   += sum_k dz[m, k] * W[v_lo + k, :]  (ACC = the fp32 accumulator; the last chunk
  writes dH[rows[m], :] in the input dtype through C_ROWS instead)
Every output tile is written by one program and the K loop runs in a fixed order, so results are
deterministic; accumulation is fp32 both within a chunk (the dot) and across chunks (ACC).
Row gathers use int64 offsets. Tiles are visited in GROUP_M-grouped order for L2 reuse of B.
"""

import triton
import triton.language as tl

from .config import TileConfig


@triton.jit
def _grad_matmul_kernel(
    A, B, C, ACC, B_ROWS, C_ROWS,
    SIZE_M, SIZE_N, SIZE_K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_accm, stride_accn,
    B_GATHER: tl.constexpr, C_SCATTER: tl.constexpr, HAS_ACC: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(SIZE_M, BLOCK_M)
    num_n = tl.cdiv(SIZE_N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < SIZE_M
    n_ok = offs_n < SIZE_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, SIZE_K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < SIZE_K
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if B_GATHER:
            b_rows = tl.load(B_ROWS + offs_k, mask=k_ok, other=0).to(tl.int64)
        else:
            b_rows = offs_k.to(tl.int64)
        b = tl.load(B + b_rows[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_ACC:
        acc += tl.load(ACC + offs_m[:, None] * stride_accm + offs_n[None, :] * stride_accn, mask=mask)
    if C_SCATTER:
        c_rows = tl.load(C_ROWS + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        c_rows = offs_m
    tl.store(C + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=mask)


def grad_matmul(a, b, c, *, b_rows=None, c_rows=None, acc=None, cfg: TileConfig, upcast: bool,
                dot_precision: str):
    """c[c_rows] (=) a @ b[b_rows] (+ acc); a [M, K] and b [K', N] may be strided views."""
    size_m, size_k = a.shape
    size_n = b.shape[1]
    grid = (triton.cdiv(size_m, cfg.mm_block_m) * triton.cdiv(size_n, cfg.mm_block_n),)
    _grad_matmul_kernel[grid](
        a, b, c, acc if acc is not None else c,
        b_rows if b_rows is not None else a, c_rows if c_rows is not None else a,
        size_m, size_n, size_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        acc.stride(0) if acc is not None else 0, acc.stride(1) if acc is not None else 0,
        B_GATHER=b_rows is not None, C_SCATTER=c_rows is not None, HAS_ACC=acc is not None,
        UPCAST=upcast, DOT_PRECISION=dot_precision,
        BLOCK_M=cfg.mm_block_m, BLOCK_N=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k,
        GROUP_M=cfg.mm_group_m, num_warps=cfg.mm_num_warps, num_stages=cfg.mm_num_stages,
    )
