"""linear_logprobs against a float64 oracle: values and every gradient, both paths, odd shapes."""

import re

import pytest
import torch
from helpers import (
    IGNORE,
    TRITON_DEVICE,
    assert_accurate,
    device_for,
    head_logprobs_eager,
    oracle_leaves,
    random_head,
    value_and_grads,
)

import mpo
from mpo.kernels import lm_head
from mpo.kernels.config import TileConfig, default_config

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPTIONS = {  # name: (temperature, softcap, bias)
    "plain": (1.0, None, False),
    "temperature": (0.7, None, False),
    "softcap_bias": (1.0, 4.0, True),
    "all": (1.3, 6.0, True),
}
# Small tiles: many vocabulary splits in the forward, several scratch chunks in the backward
# (so the fp32 dH accumulator path and per-chunk dW writes run), partial tiles everywhere.
TINY = TileConfig(block_m=32, block_v=32, block_d=32, num_warps=1, num_stages=1, mm_block_m=32,
                  mm_block_n=32, mm_block_k=32, mm_group_m=2, mm_num_warps=1, mm_num_stages=1,
                  scratch_bytes=32 * 96 * 4 * 4, min_chunk_cols=0, target_programs=128)


def check_against_oracle(impl, dtype, temperature, softcap, use_bias, N=251, D=123, V=507):
    dev = device_for(impl)
    head = random_head(N, D, V, dtype, dev, bias=use_bias)
    upstream = torch.randn(N, device=dev) * (torch.rand(N, device=dev) < 0.9)  # signed, some zeros
    opts = dict(temperature=temperature, softcap=softcap)

    ours, grads = value_and_grads(
        lambda: mpo.linear_logprobs(head.hidden, head.weight, head.targets, head.bias, impl=impl, **opts),
        head.leaves(), upstream)
    base, base_grads = value_and_grads(
        lambda: head_logprobs_eager(head.hidden, head.weight, head.bias, head.targets, **opts),
        head.leaves(), upstream)
    o_leaves = oracle_leaves(head.leaves())
    o_bias = o_leaves[2] if use_bias else None
    oracle, o_grads = value_and_grads(
        lambda: head_logprobs_eager(o_leaves[0], o_leaves[1], o_bias, head.targets, **opts),
        o_leaves, upstream.double())

    assert ours.dtype == torch.float32 and ours.shape == (N,)
    ignored = head.targets == IGNORE
    assert (ours[ignored] == 0).all(), "ignored positions must read exactly 0"
    assert (grads[0][ignored] == 0).all(), "ignored rows must get exactly zero dH"
    assert_accurate("logp", ours, base, oracle, torch.float32 if dtype == torch.float32 else dtype)
    for name, g, b, o in zip(("dH", "dW", "db"), grads, base_grads, o_grads):
        assert g.dtype == dtype
        assert_accurate(name, g, b, o, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_oracle(impl, dtype, option, poison):
    check_against_oracle(impl, dtype, *OPTIONS[option])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_triton_many_splits_and_chunks(dtype, option, poison, monkeypatch):
    monkeypatch.setattr(lm_head, "default_config", lambda device, dtype: TINY)
    check_against_oracle("triton", dtype, *OPTIONS[option])


def test_torch_path_chunks_rows(poison, monkeypatch):
    from mpo.kernels import reference

    # ~3 rows per chunk: the PyTorch path's fp32 dW/db accumulation across row chunks.
    monkeypatch.setattr(reference, "CHUNK_ELEMS", 3 * 507)
    check_against_oracle("torch", torch.float32, *OPTIONS["all"])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_leading_dims_and_partial_grads(impl):
    """[B, T, D] inputs come back as [B, T]; a frozen weight gets no gradient and costs none."""
    dev = device_for(impl)
    head = random_head(3 * 37, 40, 97, torch.float32, dev)
    hidden = head.hidden.detach().reshape(3, 37, 40).requires_grad_()
    weight = head.weight.detach()  # frozen
    targets = head.targets.reshape(3, 37)
    out = mpo.linear_logprobs(hidden, weight, targets, impl=impl)
    assert out.shape == (3, 37)
    ref = head_logprobs_eager(hidden.double(), weight.double(), None, targets)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    out.sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    head_logprobs_eager(h64, weight.double(), None, targets).sum().backward()
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_targets_ignored(impl):
    dev = device_for(impl)
    head = random_head(17, 32, 50, torch.float32, dev, bias=True, ignore_frac=1.0)
    out = mpo.linear_logprobs(head.hidden, head.weight, head.targets, head.bias, impl=impl)
    assert (out == 0).all()
    out.sum().backward()
    for x in head.leaves():
        assert (x.grad == 0).all()


def test_kernels_use_no_atomics():
    """Bitwise reproducibility run to run rests on every reduction having a fixed order: no atomic
    adds anywhere in the kernels. (The interpreter runs programs one by one, so running twice here
    could not show an order-dependent sum; tests/test_gpu.py runs the compiled kernels twice.)"""
    from pathlib import Path

    import mpo.kernels

    (folder,) = [Path(p) for p in mpo.kernels.__path__]
    sources = {f.name: f.read_text() for f in folder.glob("*.py")}
    assert "lm_head.py" in sources
    used = {name: re.findall(r"tl\.atomic_\w+|\.index_add_?\(|\.scatter_add_?\(", src)
            for name, src in sources.items() if name != "reference.py"}
    assert not {k: v for k, v in used.items() if v}


def test_default_configs_are_valid():
    """Every family's config tiles cleanly: powers of two, dot-sized, scratch holds one tile."""
    from mpo.kernels import config

    for cfg in (config._HOPPER, config._AMPERE, config._OTHER, config._INTERPRETER):
        for b in (cfg.block_m, cfg.block_v, cfg.block_d, cfg.mm_block_m, cfg.mm_block_n, cfg.mm_block_k):
            assert b >= 16 and b & (b - 1) == 0
    assert default_config(torch.device("cpu"), torch.bfloat16) is config._INTERPRETER


@pytest.mark.parametrize("trainable", ["hidden", "weight", "hidden+weight", "bias"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_partial_requires_grad_with_bias(impl, trainable, poison, monkeypatch):
    """A bias that needs no gradient (or inputs that need none) must not change anything else;
    small tiles put several row blocks and chunks in play."""
    monkeypatch.setattr(lm_head, "default_config", lambda device, dtype: TINY)
    dev = device_for(impl)
    head = random_head(150, 40, 200, torch.float32, dev, bias=True)
    for name, x in zip(("hidden", "weight", "bias"), head.leaves()):
        x.requires_grad_(name in trainable)
    up = torch.randn(150, device=dev)
    out = mpo.linear_logprobs(head.hidden, head.weight, head.targets, head.bias, softcap=5.0, impl=impl)
    (out * up).sum().backward()
    o = oracle_leaves(head.leaves())
    ref = head_logprobs_eager(*o, head.targets, softcap=5.0)
    (ref * up.double()).sum().backward()
    assert torch.allclose(out.detach().double(), ref.detach(), atol=1e-5)
    for name, x, y in zip(("hidden", "weight", "bias"), head.leaves(), o):
        if name in trainable:
            assert torch.allclose(x.grad.double(), y.grad, atol=1e-5), name
        else:
            assert x.grad is None, name


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_bias(impl):
    dev = device_for(impl)
    head = random_head(64, 32, 100, torch.float32, dev)
    big = torch.randn(100, 3, device=dev)
    bias = big[:, 1].requires_grad_()  # stride 3
    out = mpo.linear_logprobs(head.hidden, head.weight, head.targets, bias, impl=impl)
    ref = head_logprobs_eager(head.hidden.double(), head.weight.double(), bias.double(), head.targets)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_double_backward_is_refused():
    head = random_head(20, 16, 30, torch.float32, TRITON_DEVICE)
    out = mpo.linear_logprobs(head.hidden, head.weight, head.targets, impl="triton")
    (g,) = torch.autograd.grad(out.sum(), head.hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
