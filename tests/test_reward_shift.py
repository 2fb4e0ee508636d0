"""RewardShift over a sequence of batches, its state, and its all-reduce across 2 gloo ranks."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpo import RewardShift


def batches(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(2, 9, (1,), generator=g)), generator=g) * 2 + 1 for _ in range(n)]


def test_cumulative_is_equal_weight_mean_of_batch_means_including_current():
    shift = RewardShift("cumulative")
    means = []
    for r in batches(0):
        means.append(r.double().mean().item())
        assert shift.update(r) == pytest.approx(sum(means) / len(means), rel=1e-12)
        assert shift.value == pytest.approx(sum(means) / len(means), rel=1e-12)


def test_ema_and_none():
    ema, none = RewardShift("ema", momentum=0.9), RewardShift("none")
    expected = 0.0
    for r in batches(1):
        expected = 0.9 * expected + 0.1 * r.double().mean().item()
        assert ema.update(r) == pytest.approx(expected, rel=1e-12)
        assert none.update(r) == 0.0
    assert none.value == 0.0


def test_state_dict_round_trip_continues_identically():
    a = RewardShift("cumulative")
    bs = batches(2, 8)
    for r in bs[:4]:
        a.update(r)
    b = RewardShift("cumulative")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives a JSON checkpoint too
    for r in bs[4:]:
        assert a.update(r) == b.update(r)
    with pytest.raises(ValueError, match="mode"):
        RewardShift("ema").load_state_dict(a.state_dict())


def test_non_finite_and_empty_batches_leave_delta_unchanged():
    shift = RewardShift("cumulative")
    shift.update(torch.tensor([1.0, 3.0]))
    assert shift.update(torch.tensor([float("nan"), 1.0])) == 2.0
    assert shift.update(torch.tensor([])) == 2.0
    assert shift.update(torch.tensor([5.0])) == pytest.approx(3.5)


@pytest.mark.parametrize("kwargs", [dict(mode="running"), dict(mode="ema", momentum=1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RewardShift(**kwargs)


def _rank_worker(rank, world, init_file, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shift = RewardShift(mode, momentum=0.8)
    values = [shift.update(r) for r in batches(100 + rank)]
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(values, f)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cumulative", "ema"])
def test_all_reduce_across_two_gloo_ranks(tmp_path, mode):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), mode), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1], "every rank must hold the same delta"
    # by hand: each step folds in both ranks' batch means
    expected, seen, value = [], [], 0.0
    for r0, r1 in zip(batches(100), batches(101)):
        step = [r0.double().mean().item(), r1.double().mean().item()]
        if mode == "cumulative":
            seen += step
            value = sum(seen) / len(seen)
        else:
            value = 0.8 * value + 0.2 * sum(step) / 2
        expected.append(value)
    assert got[0] == pytest.approx(expected, rel=1e-12)


def test_mpo_loss_folds_a_whole_steps_rewards_at_end_step():
    """update_shift=False (the trainer): calls within a step use the shift of the steps before;
    end_step folds the mean of all the step's rewards in once, and only when the step applied."""
    from mpo import MPOLoss

    g = torch.Generator().manual_seed(7)
    loss = MPOLoss(beta=0.1, update_shift=False, impl="torch").train()
    reference = RewardShift("cumulative")
    weight = torch.randn(11, 8, generator=g)
    for step, applied in enumerate([True, False, True]):
        rewards = []
        for pairs in (2, 3):
            hidden = torch.randn(4 * pairs, 8, generator=g)
            targets = torch.randint(0, 11, (4 * pairs,), generator=g)
            seq_ids = torch.arange(2 * pairs).repeat_interleave(2)
            ref_c, ref_r = torch.randn(pairs, generator=g), torch.randn(pairs, generator=g)
            before = loss.reward_shift.value
            _, metrics = loss(hidden, weight, targets, seq_ids, ref_c, ref_r)
            assert before == pytest.approx(reference.value, rel=1e-6), step  # not moved mid-step
            assert metrics["reward_shift"].item() == pytest.approx(before, rel=1e-6), step
            sums = torch.zeros(2 * pairs, dtype=torch.float64).index_add_(
                0, seq_ids,
                torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0])
            rewards.append(0.1 * torch.cat([sums[0::2] - ref_c.double(), sums[1::2] - ref_r.double()]))
        loss.end_step(applied)
        if applied:
            reference.update(torch.cat(rewards).mean().reshape(1))
        assert loss.reward_shift.value == pytest.approx(reference.value, rel=1e-6), step
