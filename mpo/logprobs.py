"""Per-token target log-probs through the LM head, and their per-sequence sums, without logits.

`linear_logprobs` returns log softmax(z)[target] for every position, where
z = (hidden @ weight.T + bias), optionally soft-capped (softcap * tanh(. / softcap)), divided by
the temperature. `linear_sequence_logps` fuses the chosen/rejected reduction into the same op.
Both are differentiable in hidden, weight and bias for any upstream gradient.

Rows whose target is ignored (or, for sequence sums, whose seq_id is -1) are dropped before any
matmul, so prompt tokens cost nothing. Dispatch: the Triton kernels for CUDA tensors and under
TRITON_INTERPRET=1, the chunked PyTorch path otherwise; `impl` forces one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from mpo.kernels import config as kernel_config

IMPLS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class HeadOptions:
    """Static options of one call; held by the autograd functions so backward returns one
    gradient per tensor input."""

    temperature: float = 1.0
    softcap: float | None = None
    impl: str = "torch"  # resolved: "triton" or "torch"

    @property
    def backend(self):
        name = "lm_head" if self.impl == "triton" else "reference"
        return importlib.import_module(f"mpo.kernels.{name}")

    @property
    def math(self) -> dict:
        return {"temperature": self.temperature, "softcap": self.softcap}


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA or under TRITON_INTERPRET=1, else 'torch'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return impl
    usable = device.type == "cuda" or kernel_config.interpreting()
    if impl == "auto":
        impl = "triton" if usable else "torch"
    elif not usable:
        raise ValueError("impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    if impl == "triton":
        _check_triton(device)
    return impl


def _check_triton(device: torch.device) -> None:
    try:
        import mpo.kernels.lm_head  # noqa: F401  (imports triton)
    except ImportError as e:
        raise RuntimeError(f"the Triton path needs the `triton` package: {e}") from e
    if device.type == "cpu" and not kernel_config.INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after mpo.kernels was imported; Triton fixes the mode at "
            "import, so set it before importing mpo")


def make_options(temperature: float, softcap: float | None, impl: str, device) -> HeadOptions:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    return HeadOptions(float(temperature), None if softcap is None else float(softcap),
                       resolve_impl(impl, device))


def check_head(hidden, weight, targets, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes, dtypes and devices; flatten leading dims. Returns (hidden2d, targets1d)."""
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden and weight must be one of {_FLOAT_DTYPES}, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V={weight.shape[0]}] of {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype "
                         "(outside torch.autocast)")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def to_compute_dtype(hidden, weight, bias):
    """Under torch.autocast with mixed dtypes (e.g. bf16 activations, an fp32 LM-head weight) the
    head runs in the autocast dtype, as F.linear would; the casts are differentiable, so each
    gradient comes back in its input's dtype. The cast weight copy (V x D) lives until backward."""
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    if hidden.dtype == weight.dtype:
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def check_targets(targets_c: torch.Tensor, vocab: int) -> None:
    if targets_c.numel():
        lo, hi = torch.stack([targets_c.min(), targets_c.max()]).tolist()  # one host sync
        if lo < 0 or hi >= vocab:
            raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index; found {lo}..{hi}")


def _no_autocast(fn):
    """Run an autograd Function's forward/backward with autocast off: inputs were already cast by
    `to_compute_dtype`, and both paths must see the same dtypes."""

    def wrapped(ctx, first, *args):  # first: hidden in forward, the output gradient in backward
        with torch.autocast(first.device.type, enabled=False):
            return fn(ctx, first, *args)

    return wrapped


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, weight, bias, rows, targets_c, opts: HeadOptions):
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse, _ = opts.backend.forward(hidden, weight, bias, rows, targets_c, out=out, **opts.math)
        ctx.save_for_backward(hidden, weight, bias, rows, targets_c, lse)
        ctx.opts = opts
        return out

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_out):
        hidden, weight, bias, rows, targets_c, lse = ctx.saved_tensors
        grads = ctx.opts.backend.backward(
            hidden, weight, bias, rows, targets_c, lse, grad_out.float().contiguous(), rows,
            needs=ctx.needs_input_grad[:3], **ctx.opts.math)
        return (*grads, None, None, None)


class _SequenceLogps(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, weight, bias, rows, targets_c, row_seq, seg_offsets, opts: HeadOptions):
        lse, sums = opts.backend.forward(hidden, weight, bias, rows, targets_c,
                                         seg_offsets=seg_offsets, **opts.math)
        ctx.save_for_backward(hidden, weight, bias, rows, targets_c, row_seq, lse)
        ctx.opts = opts
        return sums

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_sums):
        hidden, weight, bias, rows, targets_c, row_seq, lse = ctx.saved_tensors
        # A sequence sum's gradient reaches each of its tokens unchanged: the kernel gathers
        # grad_sums[row_seq[m]] per row instead of materialising a per-token gradient.
        grads = ctx.opts.backend.backward(
            hidden, weight, bias, rows, targets_c, lse, grad_sums.float().contiguous(), row_seq,
            needs=ctx.needs_input_grad[:3], **ctx.opts.math)
        return (*grads, None, None, None, None, None)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                    softcap: float | None = None, ignore_index: int = -100,
                    impl: str = "auto") -> torch.Tensor:
    """Log-prob of each target under the LM head, fp32, 0 where target == ignore_index.

    hidden [..., D], weight [V, D], targets [...] (int), bias [V] or None -> [...] float32.
    impl: "auto" | "triton" | "torch" (see module docstring).
    """
    shape = targets.shape
    hidden2d, targets1d = check_head(hidden, weight, targets, bias)
    opts = make_options(temperature, softcap, impl, hidden.device)
    rows = (targets1d != ignore_index).nonzero().squeeze(1)
    targets_c = targets1d[rows].contiguous()
    check_targets(targets_c, weight.shape[0])
    out = _TokenLogprobs.apply(*to_compute_dtype(hidden2d, weight, bias), rows, targets_c, opts)
    return out.reshape(shape)


def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          seq_ids: torch.Tensor, num_seqs: int, bias: torch.Tensor | None = None, *,
                          temperature: float = 1.0, softcap: float | None = None,
                          ignore_index: int = -100,
                          impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of target log-probs straight from hidden states (the fused reduction).

    seq_ids [...] int: k >= 0 names the sequence a position's target belongs to, -1 = not counted
    (pair i -> chosen 2i, rejected 2i + 1). Returns (sums [num_seqs] fp32, differentiable;
    counts [num_seqs] int64 = positions counted per sequence, i.e. seq_id == k and a target).
    """
    hidden2d, targets1d = check_head(hidden, weight, targets, bias)
    if tuple(seq_ids.shape) != tuple(targets.shape) or seq_ids.dtype.is_floating_point:
        raise ValueError(f"seq_ids must be an integer tensor shaped like targets {tuple(targets.shape)}, "
                         f"got {tuple(seq_ids.shape)} {seq_ids.dtype}")
    opts = make_options(temperature, softcap, impl, hidden.device)
    seq1d = seq_ids.reshape(-1).to(hidden.device)
    counted = ((targets1d != ignore_index) & (seq1d >= 0)).nonzero().squeeze(1)
    # Sort counted rows by sequence (stable: token order kept within a sequence) so that every
    # sequence is one contiguous range of compacted rows.
    row_seq, order = torch.sort(seq1d[counted], stable=True)
    rows = counted[order]
    targets_c = targets1d[rows].contiguous()
    check_sequences(row_seq, num_seqs)
    check_targets(targets_c, weight.shape[0])
    counts = torch.bincount(row_seq, minlength=num_seqs)
    seg_offsets = torch.zeros(num_seqs + 1, dtype=torch.int64, device=hidden.device)
    torch.cumsum(counts, 0, out=seg_offsets[1:])
    hidden2d, weight, bias = to_compute_dtype(hidden2d, weight, bias)
    sums = _SequenceLogps.apply(hidden2d, weight, bias, rows, targets_c, row_seq, seg_offsets, opts)
    return sums, counts


def check_sequences(sorted_seq: torch.Tensor, num_seqs: int) -> None:
    if num_seqs < 0:
        raise ValueError(f"num_seqs must be >= 0, got {num_seqs}")
    if sorted_seq.numel() and int(sorted_seq[-1]) >= num_seqs:
        raise ValueError(f"seq_ids must be < num_seqs={num_seqs}; found {int(sorted_seq[-1])}")
