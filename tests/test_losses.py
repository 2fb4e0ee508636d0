"""preference_loss: every loss type against formulas written out per pair in plain Python."""

import math

import pytest
import torch

import mpo
from mpo.losses import PAIR_LOSSES, PairBatch, check_loss_spec


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


BETA, EPS, DELTA = 0.25, 0.1, 0.37


def by_hand(name, pc, pr, rc, rr, lc, lr):
    """One pair's loss, from the papers' definitions (via TRL's DPO trainer)."""
    sc, sr = pc - rc, pr - rr
    m = sc - sr
    x = BETA * m
    if name == "sigmoid":  # cDPO with label smoothing EPS
        return -(1 - EPS) * logsig(x) - EPS * logsig(-x)
    if name == "bco_pair":
        return -logsig(BETA * sc - DELTA) - logsig(-(BETA * sr - DELTA))
    if name == "hinge":
        return max(0.0, 1 - x)
    if name == "ipo":
        return ((sc / lc - sr / lr) - 1 / (2 * BETA)) ** 2
    if name == "robust":
        return (-(1 - EPS) * logsig(x) + EPS * logsig(-x)) / (1 - 2 * EPS)
    if name == "exo_pair":
        return sig(x) * (logsig(x) - math.log(1 - EPS)) + sig(-x) * (logsig(-x) - math.log(EPS))
    if name == "nca_pair":
        return -logsig(BETA * sc) - 0.5 * logsig(-BETA * sc) - 0.5 * logsig(-BETA * sr)
    if name == "sppo_hard":
        return (sc - 0.5 / BETA) ** 2 + (sr + 0.5 / BETA) ** 2
    if name == "apo_zero":
        return (1 - sig(BETA * sc)) + sig(BETA * sr)
    if name == "apo_down":
        return sig(BETA * sc) + (1 - sig(x))
    if name == "discopop":
        w = sig(x / 0.05)
        return -logsig(x) * (1 - w) + math.exp(-x) * w
    raise KeyError(name)


def random_pairs(P, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ())))
    pc, pr = (-torch.rand(P, generator=g, dtype=torch.float64) * 40,
              -torch.rand(P, generator=g, dtype=torch.float64) * 40)
    rc, rr = (pc + torch.randn(P, generator=g, dtype=torch.float64) * 3,
              pr + torch.randn(P, generator=g, dtype=torch.float64) * 3)
    lc, lr = torch.randint(1, 60, (P,), generator=g), torch.randint(1, 60, (P,), generator=g)
    return pc, pr, rc, rr, lc, lr


PER_PAIR = sorted(set(PAIR_LOSSES) - {"aot"})


@pytest.mark.parametrize("name", PER_PAIR)
def test_pair_loss_formula(name):
    P = 13
    pc, pr, rc, rr, lc, lr = random_pairs(P)
    pcg = pc.clone().requires_grad_()
    loss, metrics = mpo.preference_loss(pcg, pr, rc, rr, loss_types=[name], loss_weights=[1.0], beta=BETA,
                                        reward_shift=DELTA, label_smoothing=EPS, chosen_lengths=lc,
                                        rejected_lengths=lr)
    rows = [by_hand(name, *(float(t[i]) for t in (pc, pr, rc, rr, lc, lr))) for i in range(P)]
    expected = sum(rows) / P
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics[f"loss/{name}"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    loss.backward()  # differentiable in the policy log-probs
    assert torch.isfinite(pcg.grad).all()


def test_aot_sorts_margins():
    pc, pr, rc, rr, _, _ = random_pairs(9)
    loss, _ = mpo.preference_loss(pc, pr, rc, rr, loss_types=["aot"], loss_weights=[1.0], beta=BETA,
                                  label_smoothing=EPS)
    pol = sorted((pc - pr).tolist())
    ref = sorted((rc - rr).tolist())
    expected = sum(-(1 - EPS) * logsig(BETA * (a - b)) - EPS * logsig(-BETA * (a - b))
                   for a, b in zip(pol, ref)) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("sft_normalization", ["sequence", "token"])
def test_mpo_default_combination_and_metrics(sft_normalization):
    """0.8 * DPO + 0.2 * BCO(delta) + 1.0 * SFT (per response, or over a token count), TRL's metric names."""
    P = 16
    pc, pr, rc, rr, lc, lr = random_pairs(P)
    tokens = int(lc.sum()) + 5  # a global count larger than this batch's
    kw = {"chosen_lengths": lc} if sft_normalization == "sequence" else {"chosen_token_count": tokens}
    loss, m = mpo.preference_loss(pc, pr, rc, rr, beta=BETA, reward_shift=DELTA, sft_normalization=sft_normalization,
                                  **kw)
    rows = [(float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i])) for i in range(P)]
    dpo = sum(-logsig(BETA * ((a - c) - (b - d))) for a, b, c, d in rows) / P
    bco = sum(by_hand("bco_pair", a, b, c, d, 1, 1) for a, b, c, d in rows) / P
    if sft_normalization == "sequence":
        sft = sum(-float(pc[i]) / float(lc[i]) for i in range(P)) / P
    else:
        sft = -float(pc.sum()) / tokens
    assert loss.item() == pytest.approx(0.8 * dpo + 0.2 * bco + sft, rel=1e-5)
    assert m["loss/sigmoid"].item() == pytest.approx(dpo, rel=1e-5)
    assert m["loss/bco_pair"].item() == pytest.approx(bco, rel=1e-5)
    assert m["loss/sft"].item() == pytest.approx(sft, rel=1e-5)
    chosen = [BETA * (a - c) for a, b, c, d in rows]
    rejected = [BETA * (b - d) for a, b, c, d in rows]
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / P, rel=1e-5)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / P, rel=1e-5)
    assert m["rewards/margins"].item() == pytest.approx((sum(chosen) - sum(rejected)) / P, rel=1e-5, abs=1e-6)
    assert m["rewards/accuracies"].item() == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / P)
    assert m["logps/chosen"].item() == pytest.approx(float(pc.mean()), rel=1e-5)
    assert m["logps/rejected"].item() == pytest.approx(float(pr.mean()), rel=1e-5)
    assert all(not v.requires_grad for v in m.values())


def test_pair_count_normalises_pair_terms_only():
    pc, pr, rc, rr, lc, _ = random_pairs(6, seed=1)
    kw = dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 1.0], beta=BETA, chosen_token_count=100,
              sft_normalization="token")
    local, _ = mpo.preference_loss(pc, pr, rc, rr, **kw)
    scaled, _ = mpo.preference_loss(pc, pr, rc, rr, pair_count=24, **kw)
    sft = -float(pc.sum()) / 100
    assert (scaled.item() - sft) == pytest.approx((local.item() - sft) * 6 / 24, rel=1e-5)


def test_sft_count_defaults_to_chosen_lengths():
    pc, pr, rc, rr, lc, _ = random_pairs(5, seed=2)
    loss, _ = mpo.preference_loss(pc, pr, rc, rr, loss_types=["sft"], loss_weights=[1.0], chosen_lengths=lc,
                                  sft_normalization="token")
    assert loss.item() == pytest.approx(-float(pc.sum()) / float(lc.sum()), rel=1e-6)


def test_sequence_sft_is_the_authors_arithmetic():
    """The MPO authors' trainer: one pair per micro-batch, the SFT term a token mean within it
    (-log pi(y_c|x) / |y_c|), micro-batches averaged by gradient accumulation. The "sequence"
    normalisation over the whole step, or over micro-batches with the step's pair_count, equals
    it; the "token" one does not when lengths differ."""
    P = 12
    pc, pr, rc, rr, _, _ = random_pairs(P, seed=4)
    lc = torch.tensor([20, 600, 35, 410, 88, 20, 512, 64, 300, 47, 150, 23])
    pc = (pc * lc / 10).double().requires_grad_()  # log-probs that grow with length, as real ones do
    authors = sum(mpo.preference_loss(pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta=BETA, reward_shift=DELTA,
                                      chosen_token_count=lc[i], sft_normalization="token")[0] for i in range(P)) / P
    ours, _ = mpo.preference_loss(pc, pr, rc, rr, beta=BETA, reward_shift=DELTA, chosen_lengths=lc)
    split = sum(mpo.preference_loss(pc[s], pr[s], rc[s], rr[s], beta=BETA, reward_shift=DELTA, chosen_lengths=lc[s],
                                    pair_count=P)[0] for s in (slice(0, 5), slice(5, P)))
    (g_authors,) = torch.autograd.grad(authors, pc)
    (g_ours,) = torch.autograd.grad(ours, pc)
    assert ours.item() == pytest.approx(authors.item(), rel=1e-12)
    assert split.item() == pytest.approx(authors.item(), rel=1e-12)
    assert torch.allclose(g_ours, g_authors, rtol=1e-12)
    token, _ = mpo.preference_loss(pc, pr, rc, rr, beta=BETA, reward_shift=DELTA, chosen_lengths=lc,
                                   sft_normalization="token")
    assert abs(token.item() - authors.item()) > 1e-3 * abs(authors.item())
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        mpo.preference_loss(pc, pr, rc, rr, chosen_token_count=100)
    with pytest.raises(ValueError, match="sft_normalization must be one of"):
        mpo.preference_loss(pc, pr, rc, rr, chosen_lengths=lc, sft_normalization="mean")


def test_registry_is_extensible():
    name = "test_margin_squared"
    mpo.register_pair_loss(name)(lambda b: (b.beta * b.margin) ** 2)
    try:
        pc, pr, rc, rr, _, _ = random_pairs(4, seed=3)
        loss, m = mpo.preference_loss(pc, pr, rc, rr, loss_types=[name], loss_weights=[2.0], beta=BETA)
        assert loss.item() == pytest.approx(2 * float(((BETA * ((pc - rc) - (pr - rr))) ** 2).mean()), rel=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            mpo.register_pair_loss(name)(lambda b: b.margin)
    finally:
        del PAIR_LOSSES[name]


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_types=["dpo"]), "unknown loss type"),
    (dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0]), "2 loss types"),
    (dict(loss_types=["sigmoid", "sigmoid"], loss_weights=[1.0, 1.0]), "twice"),
    (dict(loss_types=["sigmoid"], loss_weights=[float("nan")]), "finite"),
    (dict(loss_types=["sft"], loss_weights=[1.0]), "needs chosen_lengths"),
    (dict(loss_types=["sft"], loss_weights=[1.0], sft_normalization="token"), "chosen_token_count"),
    (dict(loss_types=["ipo"], loss_weights=[1.0]), "chosen_lengths"),
    (dict(loss_types=["exo_pair"], loss_weights=[1.0]), "label_smoothing"),
    (dict(loss_types=["robust"], loss_weights=[1.0], label_smoothing=0.5), "label_smoothing"),
    (dict(beta=0.0), "beta"),
])
def test_bad_arguments_raise(kwargs, match):
    pc, pr, rc, rr, _, _ = random_pairs(3, seed=4)
    with pytest.raises(ValueError, match=match):
        mpo.preference_loss(pc, pr, rc, rr, **kwargs)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"\[P\]"):
        mpo.preference_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3),
                            chosen_token_count=1)


def test_check_loss_spec_accepts_a_single_name():
    assert check_loss_spec("hinge", None) == (("hinge",), (1.0,))


def test_pair_batch_properties():
    b = PairBatch(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([3.0]), 0.1)
    assert b.chosen_logratios.item() == 0.5 and b.rejected_logratios.item() == -1.0 and b.margin.item() == 1.5
