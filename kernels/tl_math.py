"""Elementwise fp32 helpers for the kernels, built from exp and log only.

libdevice's tanh/log1p would be faster on a GPU but do not exist in Triton's CPU interpreter, and
the kernels must run the same code in both places; the cost is elementwise work next to a
D-long dot product per logit.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # For |x| >= 0.4 the exp form (1 - t) / (1 + t), t = exp(-2|x|), loses under 1 ulp to the
    # 1 - t cancellation; below 0.4 it would lose up to all of it, so use the odd Taylor series
    # up to x^13, whose truncation error there is under 2e-9 relative.
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    far = (1.0 - t) / (1.0 + t)
    x2 = x * x
    near = x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0))
    near = x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0 + near))
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + near)))
    r = tl.where(ax < 0.4, near, far)
    return tl.where(x < 0, -r, r)


@triton.jit
def log1p_small(u):
    # log(1 + u) for u in [0, 1] to full relative precision: the rounding of w = 1 + u is
    # corrected by u / (w - 1) (Goldberg's trick); w == 1 means u is below half an ulp of 1.
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def softplus(x):
    # log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)).
    return tl.maximum(x, 0.0) + log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    # 1 / (1 + exp(-x)) evaluated on the side where exp cannot overflow.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
