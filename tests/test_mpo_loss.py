"""The per-pair MPO kernel and the end-to-end MPOLoss against float64 references."""

import pytest
import torch
from helpers import IGNORE, TRITON_DEVICE, assert_accurate, device_for, head_logprobs_eager, oracle_sums

import mpo
from mpo.kernels.mpo_pair_loss import STAT_NAMES, mpo_pair_loss

WEIGHTS = {"mpo": (0.8, 0.2, 1.0), "dpo": (1.0, 0.0, 0.0), "bco+sft": (0.0, 0.5, 2.0)}


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("spread", [1.0, 300.0])  # 300: |beta * margin| ~ 30+, tails of softplus
@pytest.mark.parametrize("sft_normalization", ["sequence", "token"])
def test_pair_kernel_matches_torch_formulas(weights, spread, sft_normalization, poison):
    P, beta, delta = 37, 0.1, -0.42
    w = WEIGHTS[weights]
    g = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    sums64 = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 50 + torch.randn(2 * P, generator=g,
                                                                                     dtype=torch.float64) * spread
    ref = (sums64 + torch.randn(2 * P, generator=g, dtype=torch.float64) * spread)
    ref_c, ref_r = ref[0::2].contiguous(), ref[1::2].contiguous()
    tokens = 211.0
    lengths = torch.randint(1, 700, (P,), generator=g)
    sequence = sft_normalization == "sequence"
    sft = {"sft_normalization": sft_normalization, "chosen_token_count": tokens, "chosen_lengths": lengths}

    sums = sums64.float().to(TRITON_DEVICE)
    loss, grad, stats = mpo_pair_loss(sums, ref_c.float().to(TRITON_DEVICE), ref_r.float().to(TRITON_DEVICE),
                                      torch.tensor([tokens], device=TRITON_DEVICE), beta=beta, delta=delta,
                                      weights=w, pair_norm=50.0,
                                      chosen_lengths=lengths.float().to(TRITON_DEVICE) if sequence else None)
    # float64 reference through autograd, on the same fp32-rounded inputs
    s = sums.double().cpu().requires_grad_()
    types = [t for t, wt in zip(("sigmoid", "bco_pair", "sft"), w) if wt]
    expect, m = mpo.preference_loss(s[0::2], s[1::2], ref_c.float().double(), ref_r.float().double(),
                                    loss_types=types, loss_weights=[wt for wt in w if wt], beta=beta,
                                    reward_shift=delta, pair_count=50, **sft)
    expect.backward()
    assert loss.item() == pytest.approx(expect.item(), rel=2e-6, abs=1e-6)
    assert torch.allclose(grad.cpu().double(), s.grad, rtol=1e-5, atol=1e-7)
    named = dict(zip(STAT_NAMES, stats.cpu().double()))
    full, fm = mpo.preference_loss(s[0::2].detach(), s[1::2].detach(), ref_c.float().double(),
                                   ref_r.float().double(), beta=beta, reward_shift=delta, **sft)
    for k, v in fm.items():
        assert named[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-5), k


def test_pair_kernel_without_chosen_tokens_is_finite():
    sums = torch.tensor([-3.0, -4.0], device=TRITON_DEVICE)
    loss, grad, _ = mpo_pair_loss(sums, sums[:1], sums[1:], torch.zeros(1, device=TRITON_DEVICE),
                                  beta=0.1, delta=0.0, weights=(0.8, 0.2, 1.0))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def packed_batch(P, D, V, dtype, device, seed=None):
    """A packed row: per pair a prompt (seq -1, ignored targets), chosen (2i), rejected (2i+1)."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ())))
    seq = []
    for i in range(P):
        seq += [-1] * int(torch.randint(1, 9, (1,), generator=g))
        seq += [2 * i] * int(torch.randint(1, 13, (1,), generator=g))
        seq += [2 * i + 1] * int(torch.randint(1, 13, (1,), generator=g))
    seq = torch.tensor(seq)
    N = seq.numel()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[seq < 0] = IGNORE
    mk = lambda x: x.to(dtype).to(device).requires_grad_()
    hidden = mk(torch.randn(N, D, generator=g))
    weight = mk(torch.randn(V, D, generator=g) * (3.0 / D**0.5))
    bias = mk(torch.randn(V, generator=g) * 0.3)
    ref = torch.randn(2 * P, generator=g) * 2
    return hidden, weight, bias, targets.to(device), seq.to(device), ref


def run_loss(loss_fn, hidden, weight, bias, targets, seq, ref, **kw):
    for x in (hidden, weight, bias):
        x.grad = None
    P = ref.numel() // 2
    sums_ref = ref.to(hidden.device)
    loss, metrics = loss_fn(hidden, weight, targets, seq, sums_ref[0::2] - 5.0, sums_ref[1::2] - 5.0, bias, **kw)
    loss.backward()
    assert loss.shape == () and P > 0
    return loss.detach(), metrics, [x.grad.clone() for x in (hidden, weight, bias)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_mpo_loss_end_to_end(impl, dtype, poison):
    """Loss, metrics and every gradient of the fused op vs a float64 composition of the eager
    log-probs, exact per-sequence sums and the loss formulas."""
    P, D, V, beta = 9, 96, 301, 0.1
    dev = device_for(impl)
    hidden, weight, bias, targets, seq, ref = packed_batch(P, D, V, dtype, dev)
    crit = mpo.MPOLoss(beta=beta, impl=impl, softcap=10.0)
    loss, metrics, grads = run_loss(crit, hidden, weight, bias, targets, seq, ref)
    delta = crit.reward_shift.value

    def composed(leaves, dt):
        tok = head_logprobs_eager(*leaves, targets, softcap=10.0, compute_dtype=dt)
        sums = oracle_sums(tok.double(), seq, 2 * P)
        counts = torch.bincount(seq[seq >= 0], minlength=2 * P)
        r = ref.double().to(sums.device)
        return mpo.preference_loss(sums[0::2], sums[1::2], r[0::2] - 5.0, r[1::2] - 5.0, beta=beta,
                                   reward_shift=delta, chosen_lengths=counts[0::2])

    leaves = [hidden, weight, bias]
    for x in leaves:
        x.grad = None
    base, _ = composed(leaves, None)
    base.backward()
    base_grads = [x.grad.clone() for x in leaves]
    o_leaves = [x.detach().double().requires_grad_() for x in leaves]
    oracle, o_metrics = composed(o_leaves, torch.float64)
    oracle.backward()

    # the reward shift folded in this batch's mean reward, from the oracle's rewards
    r_bar = (o_metrics["rewards/chosen"] + o_metrics["rewards/rejected"]).item() / 2
    assert delta == pytest.approx(r_bar, rel=1e-3, abs=1e-4)
    assert metrics["reward_shift"].item() == pytest.approx(delta, rel=1e-6)
    fp = torch.float32 if dtype == torch.float32 else dtype
    assert_accurate("loss", loss.reshape(1), base.reshape(1), oracle.detach().reshape(1), fp)
    for name, g, b, o in zip(("dH", "dW", "db"), grads, base_grads, (x.grad for x in o_leaves)):
        assert_accurate(name, g, b, o, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for k in ("loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/chosen", "rewards/rejected",
              "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert metrics[k].item() == pytest.approx(o_metrics[k].item(), rel=tol, abs=tol), k


def test_reward_shift_updates_in_training_only():
    hidden, weight, bias, targets, seq, ref = packed_batch(4, 32, 64, torch.float32, TRITON_DEVICE, seed=1)
    crit = mpo.MPOLoss(impl="triton")
    run_loss(crit, hidden, weight, bias, targets, seq, ref)
    after_train = crit.reward_shift.state_dict()
    assert after_train["count"] == 1
    crit.eval()
    run_loss(crit, hidden, weight, bias, targets, seq, ref)
    assert crit.reward_shift.state_dict() == after_train


def test_fused_and_torch_paths_agree_for_other_loss_types():
    """Types outside the MPO kernel (and label smoothing) use the torch formulas on fused sums."""
    batch = packed_batch(5, 48, 97, torch.float32, TRITON_DEVICE, seed=2)
    kw = dict(loss_types=("hinge", "ipo", "sft"), loss_weights=(1.0, 0.5, 0.3), reward_shift="none")
    a = run_loss(mpo.MPOLoss(impl="triton", **kw), *batch)
    cpu = [x.detach().cpu().requires_grad_() if x.is_floating_point() else x.cpu() for x in batch[:5]]
    b = run_loss(mpo.MPOLoss(impl="torch", **kw), *cpu, batch[5])
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-5)
    for x, y in zip(a[2], b[2]):
        assert torch.allclose(x.cpu(), y, rtol=1e-4, atol=1e-6)
    assert set(a[1]) >= {"loss/hinge", "loss/ipo", "loss/sft", "reward_shift"}


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_global_normalisers_make_micro_batches_add_up(impl):
    """With the step's pair and chosen-token counts, two micro-batches' losses and gradients sum
    to the loss and gradients of the whole batch."""
    dev = device_for(impl)
    hidden, weight, bias, targets, seq, ref = packed_batch(8, 40, 120, torch.float32, dev, seed=3)
    crit = mpo.MPOLoss(impl=impl, reward_shift="none")
    whole, _, g_whole = run_loss(crit, hidden, weight, bias, targets, seq, ref)

    cut = int((seq == 8).nonzero()[0])  # first token of pair 4's chosen response
    cut = int((seq[:cut] == 7).nonzero()[-1]) + 1  # after pair 3
    tokens = int((seq >= 0).logical_and(seq % 2 == 0).sum())
    total, grads = 0.0, [torch.zeros_like(x) for x in (hidden, weight, bias)]
    for part, sl, pairs in ((0, slice(0, cut), slice(0, 8)), (1, slice(cut, None), slice(8, 16))):
        h = hidden.detach()[sl].clone().requires_grad_()
        w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        s = seq[sl] - torch.where(seq[sl] >= 0, 8 * part, 0)
        loss, _, g = run_loss(crit, h, w, b, targets[sl], s, ref[pairs], chosen_token_count=tokens,
                              pair_count=8)
        total += loss.item()
        grads[0][sl] += g[0]
        grads[1] += g[1]
        grads[2] += g[2]
    assert total == pytest.approx(whole.item(), rel=1e-5)
    for x, y in zip(grads, g_whole):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_mpo_loss_validates():
    with pytest.raises(ValueError, match="unknown loss type"):
        mpo.MPOLoss(loss_types=("sigmoid", "nope"), loss_weights=(1, 1))
    with pytest.raises(ValueError, match="reward shift mode"):
        mpo.MPOLoss(reward_shift="moving")
    hidden, weight, bias, targets, seq, ref = packed_batch(2, 16, 32, torch.float32, "cpu", seed=4)
    with pytest.raises(ValueError, match=r"\[P\] tensors"):
        mpo.MPOLoss(impl="torch")(hidden, weight, targets, seq, ref[:2], ref[:3])
    with pytest.raises(ValueError, match="num_seqs"):  # seq ids name pair 1 but only 1 pair given
        mpo.MPOLoss(impl="torch")(hidden, weight, targets, seq, ref[:1], ref[:1])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_pairs_gives_zero_loss_and_zero_grads(impl):
    dev = device_for(impl)
    hidden, weight, bias, targets, seq, _ = packed_batch(2, 16, 32, torch.float32, dev, seed=5)
    crit = mpo.MPOLoss(impl=impl)
    loss, metrics = crit(hidden, weight, targets, torch.full_like(seq, -1), torch.zeros(0), torch.zeros(0), bias)
    loss.backward()
    assert loss.item() == 0 and set(metrics) == {"reward_shift"}
    assert all((x.grad == 0).all() for x in (hidden, weight, bias))
    assert crit.reward_shift.state_dict()["count"] == 0
