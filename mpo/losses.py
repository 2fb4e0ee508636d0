"""Preference losses as pure functions of per-sequence log-prob sums, and the BCO reward shift.

Every pair loss sees the same `PairBatch` (policy and reference sums of the chosen and rejected
responses, beta, ...) and returns one loss per pair; `preference_loss` combines any of them with
weights, averages them over pairs and adds the SFT term. Other trainers can import the registry
(`PAIR_LOSSES`) or add to it with `register_pair_loss`.

Notation: s_c = pc - rc and s_r = pr - rr are the policy/reference log-ratios of the chosen and
rejected responses (sums over their tokens), m = s_c - s_r, beta the KL weight. The formulas
follow TRL's DPO trainer, which is what the MPO paper compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

MPO_LOSS_TYPES = ("sigmoid", "bco_pair", "sft")
SFT_NORMALIZATIONS = ("sequence", "token")
MPO_LOSS_WEIGHTS = (0.8, 0.2, 1.0)
DISCOPOP_TAU = 0.05  # TRL's default temperature of the DiscoPOP modulation


@dataclass(frozen=True)
class PairBatch:
    """What a pair loss sees; all tensors [P], fp32 or wider."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    beta: float
    reward_shift: float = 0.0
    label_smoothing: float = 0.0
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_logratios - self.rejected_logratios


PAIR_LOSSES: dict[str, Callable[[PairBatch], torch.Tensor]] = {}


def register_pair_loss(name: str):
    """Decorator adding `fn(batch: PairBatch) -> Tensor [P]` to the registry under `name`."""

    def add(fn):
        if name in PAIR_LOSSES or name == "sft":
            raise ValueError(f"pair loss {name!r} is already registered")
        PAIR_LOSSES[name] = fn
        return fn

    return add


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


@register_pair_loss("sigmoid")
def sigmoid_loss(b: PairBatch) -> torch.Tensor:
    """DPO: -log sigmoid(beta * m); with label smoothing eps, conservative DPO."""
    return _smoothed_sigmoid(b.beta * b.margin, b.label_smoothing)


@register_pair_loss("bco_pair")
def bco_pair_loss(b: PairBatch) -> torch.Tensor:
    """BCO on pairs: chosen reward pushed above the shift delta, rejected below it."""
    return (-F.logsigmoid(b.beta * b.chosen_logratios - b.reward_shift)
            - F.logsigmoid(-(b.beta * b.rejected_logratios - b.reward_shift)))


@register_pair_loss("hinge")
def hinge_loss(b: PairBatch) -> torch.Tensor:
    return torch.relu(1 - b.beta * b.margin)


@register_pair_loss("ipo")
def ipo_loss(b: PairBatch) -> torch.Tensor:
    """IPO on length-normalised log-probs (policy and reference alike): (m_avg - 1/(2 beta))^2."""
    if b.chosen_lengths is None or b.rejected_lengths is None:
        raise ValueError("loss type 'ipo' needs chosen_lengths and rejected_lengths")
    lc = b.chosen_lengths.to(b.chosen_logps.dtype).clamp(min=1)
    lr = b.rejected_lengths.to(b.rejected_logps.dtype).clamp(min=1)
    m_avg = b.chosen_logratios / lc - b.rejected_logratios / lr
    return (m_avg - 1 / (2 * b.beta)) ** 2


@register_pair_loss("robust")
def robust_loss(b: PairBatch) -> torch.Tensor:
    """Robust DPO: unbiased under label noise with flip rate eps (label_smoothing), eps < 0.5."""
    eps = b.label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"loss type 'robust' needs 0 <= label_smoothing < 0.5, got {eps}")
    x = b.beta * b.margin
    return (-F.logsigmoid(x) * (1 - eps) + F.logsigmoid(-x) * eps) / (1 - 2 * eps)


@register_pair_loss("exo_pair")
def exo_pair_loss(b: PairBatch) -> torch.Tensor:
    """EXO: reverse KL between the model's pair preference and the smoothed label eps."""
    eps = b.label_smoothing
    if not 0 < eps < 1:
        raise ValueError(f"loss type 'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper uses "
                         f"1e-3), got {eps}")
    x = b.beta * b.margin
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


@register_pair_loss("nca_pair")
def nca_pair_loss(b: PairBatch) -> torch.Tensor:
    xc, xr = b.beta * b.chosen_logratios, b.beta * b.rejected_logratios
    return -F.logsigmoid(xc) - 0.5 * F.logsigmoid(-xc) - 0.5 * F.logsigmoid(-xr)


@register_pair_loss("sppo_hard")
def sppo_hard_loss(b: PairBatch) -> torch.Tensor:
    half = 0.5 / b.beta
    return (b.chosen_logratios - half) ** 2 + (b.rejected_logratios + half) ** 2


@register_pair_loss("aot")
def aot_loss(b: PairBatch) -> torch.Tensor:
    """AOT: DPO on the sorted policy margins against the sorted reference margins."""
    policy = torch.sort(b.chosen_logps - b.rejected_logps).values
    ref = torch.sort(b.ref_chosen_logps - b.ref_rejected_logps).values
    return _smoothed_sigmoid(b.beta * (policy - ref), b.label_smoothing)


@register_pair_loss("apo_zero")
def apo_zero_loss(b: PairBatch) -> torch.Tensor:
    """APO-zero: raise the chosen likelihood, lower the rejected one."""
    return (1 - torch.sigmoid(b.beta * b.chosen_logratios)) + torch.sigmoid(b.beta * b.rejected_logratios)


@register_pair_loss("apo_down")
def apo_down_loss(b: PairBatch) -> torch.Tensor:
    """APO-down: lower both likelihoods, the rejected one more."""
    return torch.sigmoid(b.beta * b.chosen_logratios) + (1 - torch.sigmoid(b.beta * b.margin))


@register_pair_loss("discopop")
def discopop_loss(b: PairBatch) -> torch.Tensor:
    """DiscoPOP: logistic and exponential losses blended by sigmoid(beta * m / tau)."""
    x = b.beta * b.margin
    blend = torch.sigmoid(x / DISCOPOP_TAU)
    return -F.logsigmoid(x) * (1 - blend) + torch.exp(-x) * blend


def check_loss_spec(loss_types: Sequence[str], loss_weights: Sequence[float] | None) -> tuple:
    """Validate names and weights; returns (types, weights) as tuples (weights default to 1)."""
    types = (loss_types,) if isinstance(loss_types, str) else tuple(loss_types)
    if not types:
        raise ValueError("loss_types is empty")
    unknown = [t for t in types if t != "sft" and t not in PAIR_LOSSES]
    if unknown:
        raise ValueError(f"unknown loss type(s) {unknown}; known: {sorted([*PAIR_LOSSES, 'sft'])}")
    if len(set(types)) != len(types):
        raise ValueError(f"loss_types lists a type twice: {list(types)}")
    weights = (1.0,) * len(types) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"loss_weights must be finite, got {list(weights)}")
    return types, weights


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                    loss_types=MPO_LOSS_TYPES, loss_weights=MPO_LOSS_WEIGHTS, beta: float = 0.1,
                    reward_shift: float = 0.0, chosen_token_count=None, chosen_lengths=None,
                    rejected_lengths=None, label_smoothing: float = 0.0, pair_count=None,
                    sft_normalization: str = "sequence"):
    """Weighted sum of preference losses over P pairs -> (loss, metrics).

    Inputs are per-sequence log-prob SUMS [P]. Pair terms are averaged over pairs (over
    `pair_count` when given: a global count, so that micro-batches of one step add up to the
    step's mean). sft_normalization "sequence" (the paper's Eq. 8, and what the MPO authors'
    runs computed: one pair per micro-batch, a token mean within it): the mean over pairs of
    -chosen_logps[i] / chosen_lengths[i], a pair term like the others. "token" (TRL with
    several pairs per micro-batch): -chosen_logps.sum() / chosen_token_count (default:
    chosen_lengths.sum()), a token-weighted mean in which long responses weigh more.
    reward_shift is bco_pair's delta. metrics (detached): rewards/chosen, rewards/rejected,
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, and loss/<type> (this
    batch's mean of each term, unweighted).
    """
    types, weights = check_loss_spec(loss_types, loss_weights)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if sft_normalization not in SFT_NORMALIZATIONS:
        raise ValueError(f"sft_normalization must be one of {SFT_NORMALIZATIONS}, got {sft_normalization!r}")
    tensors = [torch.as_tensor(t) for t in (chosen_logps, rejected_logps, ref_chosen_logps,
                                             ref_rejected_logps)]
    P = tensors[0].numel()
    if P == 0 or any(t.shape != (P,) for t in tensors):
        raise ValueError("chosen/rejected and reference log-probs must be non-empty [P] tensors, got "
                         f"shapes {[tuple(t.shape) for t in tensors]}")
    pc, pr, rc, rr = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)
    batch = PairBatch(pc, pr, rc, rr, float(beta), float(reward_shift), float(label_smoothing),
                      chosen_lengths, rejected_lengths)
    if pair_count is not None and not pair_count > 0:
        raise ValueError(f"pair_count must be > 0, got {pair_count}")
    norm = P if pair_count is None else pair_count

    loss = pc.new_zeros(())
    metrics = {}
    for name, w in zip(types, weights):
        if name == "sft" and sft_normalization == "sequence":
            if chosen_lengths is None:
                raise ValueError("sft_normalization='sequence' needs chosen_lengths")
            lengths = torch.as_tensor(chosen_lengths).to(device=pc.device, dtype=pc.dtype).clamp(min=1)
            per_pair = -pc / lengths
            loss = loss + w * (per_pair.sum() / norm)
            term = per_pair.mean()
        elif name == "sft":
            count = chosen_token_count
            if count is None:
                if chosen_lengths is None:
                    raise ValueError("loss type 'sft' needs chosen_token_count or chosen_lengths")
                count = torch.as_tensor(chosen_lengths).sum()
            count = torch.as_tensor(count, dtype=pc.dtype, device=pc.device)
            # no chosen tokens: no generation term (as the fused kernel does)
            term = torch.where(count > 0, -pc.sum() / count.clamp(min=1), pc.new_zeros(()))
            loss = loss + w * term
        else:
            per_pair = PAIR_LOSSES[name](batch)
            loss = loss + w * (per_pair.sum() / norm)
            term = per_pair.mean()
        metrics[f"loss/{name}"] = term.detach()
    metrics.update(reward_metrics(pc, pr, rc, rr, beta))
    return loss, metrics


@torch.no_grad()
def reward_metrics(pc, pr, rc, rr, beta: float) -> dict[str, torch.Tensor]:
    """TRL's implicit-reward metrics, means over this batch's pairs."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }


class RewardShift:
    """bco_pair's reward shift delta, folded from each micro-batch's mean reward.

    mode "cumulative": the equal-weight mean of every batch mean seen so far, this one included
    (the MPO authors' behaviour, via TRL's RunningMoments fed a scalar per micro-batch).
    mode "ema": delta <- momentum * delta + (1 - momentum) * batch mean. mode "none": delta = 0.
    Under torch.distributed every rank's batch mean is folded in (all-reduced), so all ranks hold
    the same delta. Unlike the authors' code, the state is meant to be checkpointed
    (state_dict / load_state_dict) and is only updated on training batches by its callers.
    """

    MODES = ("cumulative", "ema", "none")

    def __init__(self, mode: str = "cumulative", momentum: float = 0.99):
        if mode not in self.MODES:
            raise ValueError(f"reward shift mode must be one of {self.MODES}, got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.mode, self.momentum = mode, float(momentum)
        self._mean = 0.0
        self._count = 0.0

    @property
    def value(self) -> float:
        return self._mean

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> float:
        """Fold in the mean of `rewards` (this micro-batch's beta*s of chosen and rejected)."""
        if self.mode == "none":
            return 0.0
        # [sum of batch means, number of batch means]; a rank with no pairs contributes nothing.
        if rewards.numel():
            stat = torch.stack([rewards.detach().double().mean(), rewards.new_ones((), dtype=torch.float64)])
        else:
            stat = torch.zeros(2, dtype=torch.float64, device=rewards.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stat)
        total, n = stat.tolist()
        # A non-finite reward (a diverged step, which the trainer skips) must not poison delta for
        # the rest of the run; after the all-reduce every rank sees the same total and agrees.
        if n == 0 or not math.isfinite(total):
            return self._mean
        if self.mode == "cumulative":
            self._count += n
            self._mean += (total - n * self._mean) / self._count
        else:
            self._mean = self.momentum * self._mean + (1 - self.momentum) * (total / n)
        return self._mean

    def state_dict(self) -> dict:
        return {"mode": self.mode, "momentum": self.momentum, "mean": self._mean, "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"reward shift state is for mode {state.get('mode')!r}, not {self.mode!r}")
        self.momentum = float(state["momentum"])
        self._mean = float(state["mean"])
        self._count = float(state["count"])

    def __repr__(self) -> str:
        return f"RewardShift(mode={self.mode!r}, value={self._mean:.6g}, count={self._count:g})"
