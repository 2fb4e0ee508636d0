"""`MPOLoss`: hidden states -> sequence log-prob sums -> preference loss, one fused op.

    sums   = linear_sequence_logps(hidden, weight, targets, seq_ids, 2P)   (kernels 1-2)
    delta  = reward_shift.update(beta * [s_c, s_r])                          (training only)
    loss   = w_p * sigmoid + w_q * bco_pair + w_g * sft                     (kernel 3)

One backward runs through all three: the pair kernel's per-sequence gradient is broadcast to the
tokens inside the log-prob backward kernel. Loss combinations other than sigmoid/bco_pair/sft, or
label smoothing, use the PyTorch formulas of `mpo.losses` on the same sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mpo.distributed import group_sum
from mpo.logprobs import linear_sequence_logps
from mpo.losses import (
    MPO_LOSS_TYPES,
    MPO_LOSS_WEIGHTS,
    SFT_NORMALIZATIONS,
    RewardShift,
    check_loss_spec,
    preference_loss,
)

_FUSED_TYPES = ("sigmoid", "bco_pair", "sft")


@dataclass(frozen=True)
class _PairSpec:
    beta: float
    delta: float
    weights: tuple[float, float, float]  # sigmoid, bco_pair, sft
    pair_norm: float | None


class _MPOPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums, ref_chosen, ref_rejected, chosen_tokens, chosen_lengths, spec: _PairSpec):
        from mpo.kernels.mpo_pair_loss import mpo_pair_loss

        loss, grad, stats = mpo_pair_loss(sums, ref_chosen, ref_rejected, chosen_tokens,
                                          beta=spec.beta, delta=spec.delta, weights=spec.weights,
                                          pair_norm=spec.pair_norm, chosen_lengths=chosen_lengths)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None


class MPOLoss(torch.nn.Module):
    """The MPO objective (or any weighted mix of `mpo.losses` types) from LM-head inputs.

    forward(hidden [..., D], weight [V, D], targets [...], seq_ids [...], ref_chosen_logps [P],
    ref_rejected_logps [P], bias=None, *, chosen_token_count=None, pair_count=None)
    -> (loss, metrics). seq_ids: pair i -> chosen 2i, rejected 2i + 1, -1 = not scored. P may be 0
    (a rank without pairs still takes part in the reward shift's all-reduce; its loss is 0).
    sft_normalization: "sequence" (the paper's per-response mean, default) or "token" (see
    `mpo.preference_loss`); chosen_token_count only serves "token".
    chosen_token_count / pair_count: global normalisers (all micro-batches and ranks of a step);
    by default this call's. The reward shift is updated by each training-mode call (the MPO
    authors' per-micro-batch cadence) unless update_shift=False, for callers that fold rewards in
    themselves (the trainer: once per optimizer step, through end_step()). Metrics: TRL's names,
    loss/<type>, reward_shift.
    """

    def __init__(self, beta: float = 0.1, loss_types: Sequence[str] = MPO_LOSS_TYPES,
                 loss_weights: Sequence[float] = MPO_LOSS_WEIGHTS,
                 reward_shift: str | RewardShift = "cumulative", *, update_shift: bool = True,
                 label_smoothing: float = 0.0, sft_normalization: str = "sequence", temperature: float = 1.0,
                 softcap: float | None = None, ignore_index: int = -100, impl: str = "auto",
                 sequence_group=None):
        super().__init__()
        # sequence parallelism: the ranks of this group hold parts of the same sequences, whose sums
        # are added over it (each rank's gradient flowing to its own part)
        self.sequence_group = sequence_group
        self.loss_types, self.loss_weights = check_loss_spec(loss_types, loss_weights)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        if sft_normalization not in SFT_NORMALIZATIONS:
            raise ValueError(f"sft_normalization must be one of {SFT_NORMALIZATIONS}, got {sft_normalization!r}")
        self.sft_normalization = sft_normalization
        self.reward_shift = (reward_shift if isinstance(reward_shift, RewardShift)
                             else RewardShift(reward_shift))
        self.update_shift = update_shift
        self._step_rewards = None  # update_shift=False: [reward sum, rewards] since the last end_step
        self.head = {"temperature": temperature, "softcap": softcap, "ignore_index": ignore_index,
                     "impl": impl}

    def forward(self, hidden, weight, targets, seq_ids, ref_chosen_logps, ref_rejected_logps,
                bias=None, *, chosen_token_count=None, pair_count=None):
        P = ref_chosen_logps.numel()
        if ref_chosen_logps.shape != (P,) or ref_rejected_logps.shape != (P,):
            raise ValueError("ref_chosen_logps and ref_rejected_logps must be [P] tensors, got "
                             f"{tuple(ref_chosen_logps.shape)} and {tuple(ref_rejected_logps.shape)}")
        ref_c = ref_chosen_logps.to(hidden.device, torch.float32).contiguous()
        ref_r = ref_rejected_logps.to(hidden.device, torch.float32).contiguous()
        sums, counts = linear_sequence_logps(hidden, weight, targets, seq_ids, 2 * P, bias, **self.head)
        if self.sequence_group is not None:
            sums, counts = group_sum(sums, self.sequence_group), group_sum(counts, self.sequence_group)
        chosen, rejected = sums[0::2], sums[1::2]
        if chosen_token_count is None:
            chosen_token_count = counts[0::2].sum()

        delta = self.reward_shift.value
        if "bco_pair" in self.loss_types and self.training:
            with torch.no_grad():
                rewards = self.beta * torch.cat([chosen - ref_c, rejected - ref_r])
                if self.update_shift:
                    delta = self.reward_shift.update(rewards)
                else:  # folded in by end_step(), with the rest of the step's rewards
                    stat = torch.stack([rewards.double().sum(),
                                        rewards.new_tensor(rewards.numel(), dtype=torch.float64)])
                    self._step_rewards = stat if self._step_rewards is None else self._step_rewards + stat

        if P == 0:
            # A micro-batch (or rank) without pairs: it joined the reward shift's all-reduce above,
            # and its zero loss still reaches hidden and weight (zero gradients, same graph).
            return sums.sum(), {"reward_shift": torch.tensor(float(delta))}
        if self._fusable(hidden):
            w = dict(zip(self.loss_types, self.loss_weights))
            spec = _PairSpec(self.beta, float(delta), tuple(w.get(t, 0.0) for t in _FUSED_TYPES),
                             None if pair_count is None else float(pair_count))
            tokens = torch.as_tensor(chosen_token_count, dtype=torch.float32, device=hidden.device)
            lengths = counts[0::2].float() if self.sft_normalization == "sequence" else None
            loss, stats = _MPOPairLoss.apply(sums, ref_c, ref_r, tokens.reshape(1), lengths, spec)
            metrics = _stat_metrics(stats, self.loss_types)
        else:
            loss, metrics = preference_loss(
                chosen, rejected, ref_c, ref_r, loss_types=self.loss_types,
                loss_weights=self.loss_weights, beta=self.beta, reward_shift=delta,
                chosen_token_count=chosen_token_count, chosen_lengths=counts[0::2],
                rejected_lengths=counts[1::2], label_smoothing=self.label_smoothing,
                pair_count=pair_count, sft_normalization=self.sft_normalization)
        metrics["reward_shift"] = torch.tensor(float(delta))
        return loss, metrics

    @torch.no_grad()
    def end_step(self, applied: bool = True) -> None:
        """update_shift=False: fold the mean reward of every training call since the last end_step
        (over all ranks: one all-reduce, on every rank) into the shift when `applied`, and start over."""
        stat, self._step_rewards = self._step_rewards, None
        if not applied or stat is None or "bco_pair" not in self.loss_types:
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stat)
        total, n = stat.tolist()
        if n:
            self.reward_shift.update(stat.new_tensor([total / n]))

    def _fusable(self, hidden) -> bool:
        from mpo.logprobs import resolve_impl

        return (set(self.loss_types) <= set(_FUSED_TYPES) and self.label_smoothing == 0.0
                and resolve_impl(self.head["impl"], hidden.device) == "triton")

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_types={list(self.loss_types)}, "
                f"loss_weights={list(self.loss_weights)}, reward_shift={self.reward_shift}")


def _stat_metrics(stats: torch.Tensor, loss_types) -> dict[str, torch.Tensor]:
    from mpo.kernels.mpo_pair_loss import STAT_NAMES

    return {name: stats[i] for i, name in enumerate(STAT_NAMES)
            if not name.startswith("loss/") or name[len("loss/"):] in loss_types}
