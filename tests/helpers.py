"""Shared test helpers: devices, random problems, the float64 oracle and the accuracy rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
# The device the Triton path runs on here: compiled on a GPU, else the CPU interpreter.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(impl: str) -> torch.device:
    return TRITON_DEVICE if impl == "triton" else torch.device("cpu")


@dataclass
class Head:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor

    def leaves(self):
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]


def random_head(N, D, V, dtype, device, *, bias=False, ignore_frac=0.2, seed=None, scale=1.0) -> Head:
    """Random LM-head inputs with logits of O(scale * 3) spread; from the test's seed unless seeded."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ())))
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * (3.0 * scale / D**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    mk = lambda x: x.to(dtype).to(device).requires_grad_()
    return Head(mk(h), mk(w), mk(b) if b is not None else None, t.to(device))


def head_logprobs_eager(hidden, weight, bias, targets, *, temperature=1.0, softcap=None,
                        compute_dtype=None):
    """Eager, materialised reference: logits in `compute_dtype` (default: the inputs' dtype),
    log_softmax, gather. In float64 it is the oracle; in the input dtype, the in-dtype baseline."""
    dt = compute_dtype or hidden.dtype
    z = torch.nn.functional.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    if dt != torch.float64:
        z = z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    valid = targets != IGNORE
    lp = z.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def random_seq_ids(N, num_seqs, device, *, unassigned=0.3, shuffled=True):
    """Sequence ids in runs (as in packed rows) or shuffled; some -1; some sequences empty."""
    g = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    ids = torch.randint(0, num_seqs, (N,), generator=g)
    if not shuffled:
        ids, _ = torch.sort(ids)
    ids[torch.rand(N, generator=g) < unassigned] = -1
    ids[ids == num_seqs - 1] = -1  # the last sequence has no tokens
    return ids.to(device)


def oracle_sums(token_values64, seq_ids, num_seqs):
    onehot = torch.zeros(num_seqs, seq_ids.numel(), dtype=torch.float64, device=seq_ids.device)
    mask = seq_ids >= 0
    onehot[seq_ids[mask], mask.nonzero().squeeze(1)] = 1.0
    return onehot @ token_values64


def value_and_grads(fn, leaves, upstream):
    """fn() -> output; returns (output detached, grads of (output * upstream).sum() per leaf)."""
    for x in leaves:
        x.grad = None
    out = fn()
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), [x.grad.detach().clone() for x in leaves]


def oracle_leaves(leaves):
    return [x.detach().double().requires_grad_() for x in leaves]


def max_err(x, ref) -> float:
    return (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def assert_accurate(name, ours, baseline, oracle, dtype, factor=1.0):
    """|oracle - ours| <= |oracle - torch_in_dtype| + tol (max norms), tol = a few ulps of `dtype`
    at the tensor's scale; and ours must be finite (catches unwritten, poisoned outputs)."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = max(oracle.abs().max().item(), 1e-30) if oracle.numel() else 1.0
    ulps = 16 if dtype == torch.float32 else 1
    tol = factor * ulps * torch.finfo(dtype).eps * scale
    err, base = max_err(ours, oracle), max_err(baseline, oracle)
    assert err <= base + tol, f"{name}: error {err:.3e} > in-dtype baseline {base:.3e} + tol {tol:.3e}"
    return err, base
