"""sequence_logps and the fused linear_sequence_logps against float64 oracles."""

import pytest
import torch
from helpers import (
    IGNORE,
    TRITON_DEVICE,
    assert_accurate,
    device_for,
    head_logprobs_eager,
    oracle_leaves,
    oracle_sums,
    random_head,
    random_seq_ids,
)

import mpo


@pytest.mark.parametrize("shuffled", [True, False])
def test_sequence_logps_sums_counts_and_grad(shuffled):
    N, S = 301, 11
    x = torch.randn(N, dtype=torch.float64) * 3
    tok = x.float().requires_grad_()
    seq = random_seq_ids(N, S, "cpu", shuffled=shuffled)
    sums, counts = mpo.sequence_logps(tok, seq, S)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(seq[seq >= 0], minlength=S))
    assert counts[-1] == 0 and sums[-1] == 0
    assert torch.allclose(sums.double(), oracle_sums(tok.detach().double(), seq, S), rtol=0, atol=1e-5)
    up = torch.randn(S)
    (sums * up).sum().backward()
    expected = torch.where(seq >= 0, up[seq.clamp(min=0)], torch.zeros(()))
    assert torch.equal(tok.grad, expected)


def test_sequence_logps_keeps_shape_and_dtype_of_grad():
    tok = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
    seq = torch.arange(36).reshape(4, 9) % 5
    sums, _ = mpo.sequence_logps(tok, seq, 5)
    sums.sum().backward()
    assert tok.grad.shape == (4, 9) and tok.grad.dtype == torch.bfloat16
    assert (tok.grad == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_sequence_logps_matches_oracle(impl, dtype, poison):
    """Fused sums == oracle sums of oracle token log-probs; every gradient for a per-sequence
    upstream (which reaches each token of the sequence unchanged)."""
    N, D, V, S = 251, 123, 507, 14
    dev = device_for(impl)
    head = random_head(N, D, V, dtype, dev, bias=True)
    seq = random_seq_ids(N, S, dev)
    up = torch.randn(S, device=dev)
    opts = dict(temperature=0.9, softcap=8.0)

    for x in head.leaves():
        x.grad = None
    sums, counts = mpo.linear_sequence_logps(head.hidden, head.weight, head.targets, seq, S, head.bias,
                                             impl=impl, **opts)
    (sums * up).sum().backward()
    grads = [x.grad.clone() for x in head.leaves()]

    # in-dtype baseline and float64 oracle: eager token log-probs, then exact sums
    def sums_of(leaves, dt):
        tok = head_logprobs_eager(*leaves, head.targets, compute_dtype=dt, **opts)
        return oracle_sums(tok.double(), seq, S)

    for x in head.leaves():
        x.grad = None
    base = sums_of(head.leaves(), None)
    (base * up.double()).sum().backward()
    base_grads = [x.grad.clone() for x in head.leaves()]
    o_leaves = oracle_leaves(head.leaves())
    oracle = sums_of(o_leaves, torch.float64)
    (oracle * up.double()).sum().backward()

    counted = (seq >= 0) & (head.targets != IGNORE)
    assert torch.equal(counts, torch.bincount(seq[counted], minlength=S))
    assert sums[-1] == 0
    assert_accurate("sums", sums, base, oracle, torch.float32 if dtype == torch.float32 else dtype)
    for name, g, b, o in zip(("dH", "dW", "db"), grads, base_grads, (x.grad for x in o_leaves)):
        assert_accurate(name, g, b, o, dtype)


def test_fused_sums_equal_sums_of_token_logprobs():
    """The fused epilogue and the two-step path (token log-probs, then sequence_logps) agree."""
    head = random_head(200, 64, 300, torch.float32, TRITON_DEVICE, seed=5)
    seq = random_seq_ids(200, 9, TRITON_DEVICE)
    fused, c1 = mpo.linear_sequence_logps(head.hidden, head.weight, head.targets, seq, 9, impl="triton")
    tok = mpo.linear_logprobs(head.hidden, head.weight, head.targets, impl="triton")
    two_step, _ = mpo.sequence_logps(tok, torch.where(head.targets == IGNORE, -1, seq), 9)
    # fp32 sums of up to ~200 nats summed in two orders: a few ulps apart (2 ulps = 3e-5 at 180 seen)
    assert torch.allclose(fused, two_step, rtol=1e-6, atol=1e-6)
    assert c1.sum() == ((seq >= 0) & (head.targets != IGNORE)).sum()
