"""The packing planner: native and Python give identical rows; rows are valid and full."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpo.data import plan_packing
from mpo.data.plan import plan_packing_python

BACKENDS = ["native", "python"]


def random_case(rng):
    max_tokens = rng.randint(1, 5000)
    n = rng.randint(0, 700)
    lengths = [rng.randint(1, max_tokens) for _ in range(n)]
    seed = rng.choice([None, 0, 7, 2**63 + 11, rng.randint(0, 2**64 - 1)])
    return lengths, max_tokens, seed, rng.randint(1, 800)


def fresh_rng():
    """Fresh inputs every run, reproducible from the seed in a failure message."""
    seed = random.randrange(2**32)
    return random.Random(seed), seed


def test_native_equals_python_on_random_inputs():
    rng, case_seed = fresh_rng()
    for _ in range(400):
        lengths, max_tokens, seed, window = random_case(rng)
        native = plan_packing(lengths, max_tokens, seed=seed, window=window, backend="native")
        python = plan_packing(lengths, max_tokens, seed=seed, window=window, backend="python")
        assert native == python, f"case seed {case_seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_are_a_partition_within_budget(backend):
    rng, case_seed = fresh_rng()
    for _ in range(50):
        lengths, max_tokens, seed, window = random_case(rng)
        rows = plan_packing(np.array(lengths, dtype=np.int64), max_tokens, seed=seed, window=window,
                            backend=backend)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths))), f"case seed {case_seed}"
        assert all(row and sum(lengths[i] for i in row) <= max_tokens for row in rows), f"case seed {case_seed}"


def test_first_fit_decreasing_by_hand():
    # data order (seed None), one window: sorted 8, 7, 5, 3, 2 -> [8, 2], [7, 3], [5]
    assert plan_packing([5, 3, 8, 2, 7], 10, seed=None) == [[2, 3], [4, 1], [0]]
    # windows of 2 in data order: {5, 3} -> [[0, 1]], {8, 2} -> [[2, 3]], {7} -> [[4]]
    assert plan_packing([5, 3, 8, 2, 7], 10, seed=None, window=2) == [[0, 1], [2, 3], [4]]


def test_seed_is_deterministic_and_matters():
    lengths = list(range(1, 200))
    a = plan_packing(lengths, 300, seed=1, window=16)
    assert a == plan_packing(lengths, 300, seed=1, window=16)
    assert a != plan_packing(lengths, 300, seed=2, window=16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths, kwargs, match", [
    ([5, 11], {}, "index 1"),
    ([5, 0], {}, "index 1"),
    ([5, -3], {}, "index 1"),
    ([5], {"max_tokens": 0}, "max_tokens"),
    ([5], {"window": 0}, "window"),
    ([5], {"seed": -1}, "seed"),
    ([5], {"seed": 2**64}, "seed"),
])
def test_bad_input_raises_value_error(backend, lengths, kwargs, match):
    kw = {"max_tokens": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_packing(lengths, kw.pop("max_tokens"), backend=backend, **kw)


def test_rows_are_nearly_full_on_realistic_lengths():
    rng = np.random.default_rng(3)
    lengths = np.clip(rng.lognormal(np.log(1100), 0.6, 20000), 16, 16384).astype(np.int64)
    rows = plan_packing(lengths, 16384)
    assert lengths.sum() / (len(rows) * 16384) > 0.95


def test_python_twin_is_the_reference():
    assert plan_packing_python([4, 4, 4], 8, None, 3) == [[0, 1], [2]]


@pytest.mark.slow
def test_bench_packing_smoke():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_packing.py"), "--pairs", "20000",
                           "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical rows: True" in proc.stdout and "real tokens" in proc.stdout
