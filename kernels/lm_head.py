"""The fused LM-head log-prob op on the Triton path: forward and backward over compacted rows.

Forward (2*M*D*V flops): `lse_partials` then `lse_merge` -> lse [M] and per-token log-probs or
per-sequence sums. Backward (6*M*D*V flops), per vocabulary chunk of width Vc (bounded scratch):
    dz   = logits_grad(...)            [M, Vc] in the input dtype (recomputes the logit tiles)
    dW[chunk]  = dz^T @ H[rows]        written once, fp32 accumulation over M
    dH_acc    += dz @ W[chunk]         fp32 accumulator [M, D] across chunks (in chunk order)
    db[chunk]  = fixed-order sum of per-row-block column sums
Nothing [M, V]-sized is ever allocated. Extra memory: the scratch (max(cfg.scratch_bytes,
M * cfg.min_chunk_cols * itemsize)) plus, when V spans more than one chunk, the fp32 dH accumulator
(4*M*D bytes): accumulating the chunks into the 16-bit gradient instead would round once per chunk.
No atomics: the result is bitwise reproducible run to run.

Under the CPU interpreter with bf16, tiles are upcast after loading and the scratch and outputs
are fp32, then rounded by torch (the interpreter's own fp32->bf16 cast truncates).
"""

from __future__ import annotations

import torch
import triton

from .config import INTERPRETED, TileConfig, default_config
from .grad_matmul import grad_matmul
from .logits_grad import logits_grad, scratch_columns
from .lse_merge import lse_merge
from .lse_partials import lse_partials


def _modes(dtype: torch.dtype) -> tuple[bool, str]:
    # INTERPRETED, not the environment now: what counts is how the kernels were decorated.
    upcast = INTERPRETED and dtype == torch.bfloat16
    # fp32 inputs get true fp32 products (torch's default for fp32 matmul), not TF32.
    return upcast, "ieee" if dtype == torch.float32 else "tf32"


def forward(hidden, weight, bias, rows, targets, *, temperature: float, softcap: float | None,
            out: torch.Tensor | None = None, seg_offsets: torch.Tensor | None = None,
            cfg: TileConfig | None = None):
    """Token mode: fills `out` [N] at `rows`. Segment mode: returns sums per `seg_offsets` range.

    rows (int64 [M]) are the compacted rows, sorted by sequence in segment mode; targets [M].
    Returns (lse [M] fp32, sums [S] fp32 or None).
    """
    cfg = cfg or default_config(hidden.device, hidden.dtype)
    upcast, precision = _modes(hidden.dtype)
    part_m, part_s, target_logit = lse_partials(
        hidden, weight, bias, rows, targets, temperature=temperature, softcap=softcap, cfg=cfg,
        upcast=upcast, dot_precision=precision)
    return lse_merge(part_m, part_s, target_logit, rows, out=out, seg_offsets=seg_offsets)


def backward(hidden, weight, bias, rows, targets, lse, grad, grad_index, *, temperature: float,
             softcap: float | None, needs: tuple[bool, bool, bool], cfg: TileConfig | None = None):
    """Gradients for an upstream `grad` gathered per compacted row through `grad_index`.

    needs = (hidden, weight, bias). Returns (dH [N, D] | None, dW [V, D] | None, db [V] | None) in
    the input dtypes; rows not in `rows` get zero dH.
    """
    cfg = cfg or default_config(hidden.device, hidden.dtype)
    upcast, precision = _modes(hidden.dtype)
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    (N, D), V, M = hidden.shape, weight.shape[0], rows.numel()
    dev = hidden.device
    work_dtype = torch.float32 if upcast else hidden.dtype

    d_hidden = torch.zeros((N, D), dtype=work_dtype, device=dev) if need_h else None
    d_weight = None
    if need_w:
        d_weight = (torch.empty if M else torch.zeros)((V, D), dtype=work_dtype, device=dev)
    d_bias = torch.zeros((V,), dtype=torch.float32, device=dev) if need_b else None
    if M == 0 or not (need_h or need_w or need_b):
        return _finish(d_hidden, d_weight, d_bias, hidden, weight, bias)

    chunk = scratch_columns(M, torch.finfo(work_dtype).bits // 8, V, cfg)
    n_chunks = triton.cdiv(V, chunk)
    dz = torch.empty((M, chunk), dtype=work_dtype, device=dev)
    db_part = (torch.empty((triton.cdiv(M, cfg.block_m), chunk), dtype=torch.float32, device=dev)
               if need_b else None)
    dh_acc = (torch.empty((M, D), dtype=torch.float32, device=dev)
              if need_h and n_chunks > 1 else None)
    mm = dict(cfg=cfg, upcast=upcast, dot_precision=precision)

    for i in range(n_chunks):
        v_lo, v_hi = i * chunk, min((i + 1) * chunk, V)
        logits_grad(hidden, weight, bias, rows, targets, lse, grad, grad_index, dz, db_part,
                    v_lo=v_lo, v_hi=v_hi, temperature=temperature, softcap=softcap, **mm)
        dz_chunk = dz[:, : v_hi - v_lo]
        if need_w:
            grad_matmul(dz_chunk.t(), hidden, d_weight[v_lo:v_hi], b_rows=rows, **mm)
        if need_h:
            last = i == n_chunks - 1
            grad_matmul(dz_chunk, weight[v_lo:v_hi], d_hidden if last else dh_acc,
                        c_rows=rows if last else None, acc=dh_acc if i > 0 else None, **mm)
        if need_b:
            torch.sum(db_part[:, : v_hi - v_lo], dim=0, out=d_bias[v_lo:v_hi])
    return _finish(d_hidden, d_weight, d_bias, hidden, weight, bias)


def _finish(d_hidden, d_weight, d_bias, hidden, weight, bias):
    return (
        d_hidden.to(hidden.dtype) if d_hidden is not None else None,
        d_weight.to(weight.dtype) if d_weight is not None else None,
        d_bias.to(bias.dtype) if d_bias is not None else None,
    )
