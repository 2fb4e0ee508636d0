"""The three MPO terms, their gradients and the TRL metrics, for all P pairs in one launch.

Inputs are per-sequence log-prob SUMS interleaved as pair i -> chosen 2i, rejected 2i + 1
(pc, pr), the reference sums (rc, rr), beta, the reward shift delta and the weights. With
    x_c = beta * (pc - rc),  x_r = beta * (pr - rr),  u = x_c - x_r:
    preference (sigmoid)  l_p = softplus(-u)                            dl_p/du   = -sigmoid(-u)
    quality    (bco_pair) l_q = softplus(-(x_c - delta)) + softplus(x_r - delta)
                          dl_q/dx_c = -sigmoid(-(x_c - delta)),         dl_q/dx_r = sigmoid(x_r - delta)
    generation (sft), per response ("sequence", the paper's Eq. 8):
                          l_g,i = -pc_i / len_i                           dl_g,i/dpc_i = -1 / len_i
    loss = (w_p * sum_i l_p + w_q * sum_i l_q + w_g * sum_i l_g,i) / pair_norm
    or per token ("token", when no lengths are given):
                          l_g = -sum_i pc_i / n_chosen_tokens           dl_g/dpc  = -1 / n_chosen_tokens
    loss = (w_p * sum_i l_p + w_q * sum_i l_q) / pair_norm + w_g * l_g
pair_norm is P, or the step's global pair count when micro-batches are accumulated. A weight of 0
drops its term. One program walks the pairs in BLOCK steps and reduces in a fixed order
(deterministic; P is a micro-batch's pair count, so one program is plenty). It writes LOSS [1],
GRAD [2P] = dloss/d(sums) for a unit upstream gradient, and STATS [len(STAT_NAMES)] (the terms
and TRL's reward metrics as means over this launch's P pairs; the token-normalised sft term as
it enters the loss). n_chosen_tokens is read from device memory so the caller needs no host sync.
"""

import torch
import triton
import triton.language as tl

from .tl_math import sigmoid, softplus

STAT_NAMES = (
    "loss/sigmoid", "loss/bco_pair", "loss/sft",
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
)


@triton.jit
def _mpo_pair_loss_kernel(
    LOGPS, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS, CHOSEN_LENGTHS, LOSS, GRAD, STATS,
    P, pair_norm, beta, delta, w_pref, w_qual, w_gen,
    PER_SEQUENCE: tl.constexpr, BLOCK: tl.constexpr,
):
    inv_p = 1.0 / P
    inv_norm = 1.0 / pair_norm
    n_tokens = tl.load(CHOSEN_TOKENS).to(tl.float32)
    inv_tokens = tl.where(n_tokens > 0, 1.0 / tl.maximum(n_tokens, 1.0), 0.0)  # none: l_g = 0
    sum_pref = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_qual = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_pc = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_pr = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_xc = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_xr = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_gen = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        ok = offs < P
        pc = tl.load(LOGPS + 2 * offs, mask=ok, other=0.0)
        pr = tl.load(LOGPS + 2 * offs + 1, mask=ok, other=0.0)
        x_c = beta * (pc - tl.load(REF_CHOSEN + offs, mask=ok, other=0.0).to(tl.float32))
        x_r = beta * (pr - tl.load(REF_REJECTED + offs, mask=ok, other=0.0).to(tl.float32))
        u = x_c - x_r
        q_c = x_c - delta
        q_r = x_r - delta
        d_pref = -sigmoid(-u)
        if PER_SEQUENCE:
            lengths = tl.load(CHOSEN_LENGTHS + offs, mask=ok, other=1.0).to(tl.float32)
            inv_len = 1.0 / tl.maximum(lengths, 1.0)
            g_c = inv_norm * (beta * (w_pref * d_pref - w_qual * sigmoid(-q_c)) - w_gen * inv_len)
            sum_gen += tl.where(ok, -pc * inv_len, 0.0)
        else:
            g_c = beta * inv_norm * (w_pref * d_pref - w_qual * sigmoid(-q_c)) - w_gen * inv_tokens
        g_r = beta * inv_norm * (-w_pref * d_pref + w_qual * sigmoid(q_r))
        tl.store(GRAD + 2 * offs, g_c, mask=ok)
        tl.store(GRAD + 2 * offs + 1, g_r, mask=ok)

        sum_pref += tl.where(ok, softplus(-u), 0.0)
        sum_qual += tl.where(ok, softplus(-q_c) + softplus(q_r), 0.0)
        sum_pc += pc
        sum_pr += pr
        sum_xc += x_c
        sum_xr += x_r
        sum_acc += tl.where(ok & (x_c > x_r), 1.0, 0.0)

    pref = tl.sum(sum_pref, axis=0)
    qual = tl.sum(sum_qual, axis=0)
    chosen_rewards = tl.sum(sum_xc, axis=0) * inv_p
    rejected_rewards = tl.sum(sum_xr, axis=0) * inv_p
    if PER_SEQUENCE:
        gen = tl.sum(sum_gen, axis=0)
        tl.store(LOSS, (w_pref * pref + w_qual * qual + w_gen * gen) * inv_norm)
        tl.store(STATS + 2, gen * inv_p)
    else:
        gen = -tl.sum(sum_pc, axis=0) * inv_tokens
        tl.store(LOSS, (w_pref * pref + w_qual * qual) * inv_norm + w_gen * gen)
        tl.store(STATS + 2, gen)
    tl.store(STATS + 0, pref * inv_p)
    tl.store(STATS + 1, qual * inv_p)
    tl.store(STATS + 3, chosen_rewards)
    tl.store(STATS + 4, rejected_rewards)
    tl.store(STATS + 5, tl.sum(sum_acc, axis=0) * inv_p)
    tl.store(STATS + 6, chosen_rewards - rejected_rewards)
    tl.store(STATS + 7, tl.sum(sum_pc, axis=0) * inv_p)
    tl.store(STATS + 8, tl.sum(sum_pr, axis=0) * inv_p)


def mpo_pair_loss(logps, ref_chosen, ref_rejected, chosen_tokens, *, beta: float, delta: float,
                  weights: tuple[float, float, float], pair_norm: float | None = None,
                  chosen_lengths: torch.Tensor | None = None, block: int = 256):
    """logps fp32 [2P] (interleaved sums); chosen_tokens: 1-element tensor on the same device;
    chosen_lengths [P]: the sft term per response (else per token of chosen_tokens).

    Returns (loss [] , grad [2P], stats [len(STAT_NAMES)]), fp32.
    """
    P = ref_chosen.numel()
    loss = torch.empty((), dtype=torch.float32, device=logps.device)
    grad = torch.empty_like(logps)
    stats = torch.empty((len(STAT_NAMES),), dtype=torch.float32, device=logps.device)
    _mpo_pair_loss_kernel[(1,)](
        logps, ref_chosen, ref_rejected, chosen_tokens,
        chosen_tokens if chosen_lengths is None else chosen_lengths, loss, grad, stats,
        P, float(P if pair_norm is None else pair_norm), float(beta), float(delta),
        float(weights[0]), float(weights[1]), float(weights[2]),
        PER_SEQUENCE=chosen_lengths is not None, BLOCK=min(block, max(16, triton.next_power_of_2(P))),
    )
    return loss, grad, stats
