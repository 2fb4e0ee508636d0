"""One [BLOCK_M x BLOCK_V] tile of scaled logits, shared by the forward and backward kernels.

    a[m, v] = sum_d H[rows[m], d] * W[v, d] + b[v]          (fp32 accumulation over D)
    c[m, v] = softcap * tanh(a / softcap)                    (when HAS_SOFTCAP)
    z[m, v] = c[m, v] / temperature

Rows are addressed through `rows` (the compacted row list: ignored targets never reach a matmul);
H and W are read in BLOCK_D slices with int64 offsets, so N * D and V * D may exceed 2^31.
Out-of-range rows and vocabulary columns load zeros; the callers mask what they store.
Under the CPU interpreter bf16 tiles are upcast right after loading (UPCAST), because the
interpreter's bf16 dot and sums operate on raw bit patterns.
Returns z and, for the softcap chain rule, t = c / softcap (= tanh(a / softcap)).
"""

import triton
import triton.language as tl

from .tl_math import tanh


@triton.jit
def logit_tile(
    H, W, B, rows, row_ok, offs_v, v_ok, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = H + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_ptrs = W + offs_v.to(tl.int64)[:, None] * stride_wv + offs_d[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        h = tl.load(h_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        acc += tl.load(B + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = tanh(acc / softcap)
        acc = softcap * t
    else:
        t = acc
    return acc / temperature, t
