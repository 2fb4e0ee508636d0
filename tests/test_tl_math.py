"""The kernels' exp/log-built tanh, softplus and sigmoid against float64, near 0 and in the tails."""

import pytest
import torch
import triton
import triton.language as tl
from helpers import TRITON_DEVICE

from mpo.kernels import tl_math


@triton.jit
def _apply(X, TANH, SOFTPLUS, SIGMOID, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + offs, mask=ok, other=0.0)
    tl.store(TANH + offs, tl_math.tanh(x), mask=ok)
    tl.store(SOFTPLUS + offs, tl_math.softplus(x), mask=ok)
    tl.store(SIGMOID + offs, tl_math.sigmoid(x), mask=ok)


def test_elementwise_helpers_are_accurate():
    mags = torch.cat([torch.logspace(-30, 2.5, 2000, dtype=torch.float64),
                      torch.linspace(0.38, 0.42, 101, dtype=torch.float64)])  # the tanh switch
    x64 = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)])
    x = x64.float().to(TRITON_DEVICE)
    outs = [torch.empty_like(x) for _ in range(3)]
    _apply[(triton.cdiv(x.numel(), 512),)](x, *outs, x.numel(), BLOCK=512)
    xr = x.double().cpu()  # the fp32-rounded inputs, in float64
    refs = [torch.tanh(xr), torch.nn.functional.softplus(xr, threshold=1000), torch.sigmoid(xr)]
    # Compiled tl.exp is ex2.approx(x * log2(e)): the rounding of that product costs ~|x| * 0.5 ulp
    # more than the interpreter's exact exp, which the limit allows for on a GPU.
    limit = 4 + (2 * xr.abs() if TRITON_DEVICE.type == "cuda" else 0)
    for name, out, ref in zip(("tanh", "softplus", "sigmoid"), outs, refs):
        out = out.double().cpu()
        ulp = torch.finfo(torch.float32).eps * ref.abs().clamp(min=torch.finfo(torch.float32).tiny)
        excess = ((out - ref).abs() / ulp - limit).max().item()
        assert excess <= 0, f"{name}: {excess:.1f} ulp over the limit"


@pytest.mark.parametrize("x", [0.0, 1e-30, -3.0, 88.0, -104.0])
def test_softplus_edge_values_are_finite(x):
    X = torch.tensor([x], device=TRITON_DEVICE)
    outs = [torch.empty_like(X) for _ in range(3)]
    _apply[(1,)](X, *outs, 1, BLOCK=16)
    assert all(torch.isfinite(o).all() for o in outs)
