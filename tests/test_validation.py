"""Bad inputs fail with a ValueError naming the problem; dispatch picks and forces paths."""

import pytest
import torch

import mpo
from mpo.logprobs import resolve_impl


def inputs(N=6, D=8, V=10):
    return torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,))


@pytest.mark.parametrize("mutate, match", [
    (lambda h, w, t: (h[0], w, t[0]), "hidden must be"),
    (lambda h, w, t: (h, w[:, :5], t), "weight must be"),
    (lambda h, w, t: (h, w, t[:4]), "targets shape"),
    (lambda h, w, t: (h.double(), w.double(), t), "must be one of"),
    (lambda h, w, t: (h, w.half(), t), "share a dtype"),
    (lambda h, w, t: (h, w, t.float()), "integer"),
    (lambda h, w, t: (h, w, torch.full_like(t, 10)), r"\[0, 10\)"),
    (lambda h, w, t: (h, w, torch.full_like(t, -1)), r"\[0, 10\)"),
])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_logprobs_rejects(mutate, match, impl):
    with pytest.raises(ValueError, match=match):
        mpo.linear_logprobs(*mutate(*inputs()), impl=impl)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(softcap=-1.0), "softcap"),
    (dict(impl="cuda"), "impl must be"),
    (dict(bias=torch.zeros(9)), "bias must be"),
])
def test_linear_logprobs_rejects_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mpo.linear_logprobs(*inputs(), **kwargs)


def test_sequence_inputs_rejected():
    h, w, t = inputs()
    with pytest.raises(ValueError, match="seq_ids must be"):
        mpo.linear_sequence_logps(h, w, t, torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="< num_seqs=2"):
        mpo.linear_sequence_logps(h, w, t, torch.full((6,), 2), 2)
    with pytest.raises(ValueError, match="seq_ids must be"):
        mpo.sequence_logps(torch.zeros(6), torch.zeros(6), 2)
    with pytest.raises(ValueError, match="< num_seqs=3"):
        mpo.sequence_logps(torch.zeros(6), torch.full((6,), 3), 3)


def test_ignore_index_is_configurable():
    h, w, t = inputs()
    t[:2] = 0
    out = mpo.linear_logprobs(h, w, t, ignore_index=0, impl="torch")
    assert (out[t == 0] == 0).all() and (out[t != 0] < 0).all()


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_impl("torch", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_impl("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", cpu) == "triton"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_autocast_mixed_dtypes(impl):
    """bf16 activations with an fp32 weight under autocast: computed in bf16 like F.linear would,
    each gradient returned in its own input's dtype."""
    h, w, t = inputs(N=33, D=40, V=70)
    h = h.bfloat16().requires_grad_()
    w = w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mpo.linear_logprobs(h, w, t, impl=impl)
    out.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = mpo.linear_logprobs(h.detach(), w.detach().bfloat16(), t, impl=impl)
    assert torch.equal(out, ref)
