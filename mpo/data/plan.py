"""The packing planner: which pairs share a packed row.

Deterministic first-fit-decreasing of per-pair token costs into rows of at most `max_tokens`,
over a seeded shuffle window: shuffle the pairs (splitmix64 Fisher-Yates from `seed`; data order
when seed is None), then for each window of `window` consecutive pairs, sort them longest first
(stable) and place each into the first row that has room, opening rows as needed. The window
bounds how far packing reorders the shuffled data; within it, FFD keeps rows nearly full.

The native planner (csrc/packing.cpp, module mpo._native) and `plan_packing_python` implement the
same steps and return identical rows; the native one is the fast path, the Python one the
fallback when the extension is not built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BACKENDS = ("auto", "native", "python")
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64_stream(seed: int, count: int) -> np.ndarray:
    """The first `count` outputs of splitmix64(seed), vectorised (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _MASK64) + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _shuffled_order(n: int, seed: int | None) -> list[int]:
    order = list(range(n))
    if seed is None or n < 2:
        return order
    # Fisher-Yates, i = n-1 .. 1, j = next() % (i + 1): the same draws as the native planner.
    draws = _splitmix64_stream(seed, n - 1)
    bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
    for i, j in zip(range(n - 1, 0, -1), (draws % bounds).tolist()):
        order[i], order[j] = order[j], order[i]
    return order


def plan_packing_python(lengths: Sequence[int], max_tokens: int, seed: int | None, window: int) -> list[list[int]]:
    """The reference implementation; see the module docstring."""
    n = len(lengths)
    order = _shuffled_order(n, seed)
    rows: list[list[int]] = []
    for lo in range(0, n, window):
        items = sorted(order[lo:lo + window], key=lambda i: -lengths[i])  # stable: ties keep order
        # Max segment tree over row capacities; unopened rows hold max_tokens, so the leftmost
        # leaf with room is the first-fit row, and landing on the first unopened leaf opens it.
        size = 1
        while size < len(items):
            size *= 2
        tree = [max_tokens] * (2 * size)
        first_row = len(rows)
        for item in items:
            need = lengths[item]
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= need else 2 * node + 1
            leaf = node - size
            tree[node] -= need
            node //= 2
            while node:
                left, right = tree[2 * node], tree[2 * node + 1]
                tree[node] = left if left > right else right
                node //= 2
            if first_row + leaf == len(rows):
                rows.append([])
            rows[first_row + leaf].append(item)
    return rows


def _native():
    try:
        from mpo import _native
    except ImportError:
        return None
    return _native


def plan_packing(lengths: Sequence[int], max_tokens: int, *, seed: int | None = 0, window: int = 4096,
                 backend: str = "auto") -> list[list[int]]:
    """Rows of pair indices, each row's lengths summing to at most max_tokens.

    lengths: per-pair token cost (each in 1..max_tokens, else ValueError). seed: shuffle seed
    (None: data order). window: pairs per FFD window. backend: "auto" (native when built),
    "native" or "python"; both give identical rows.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not max_tokens > 0 or not window > 0:
        raise ValueError(f"max_tokens and window must be > 0, got {max_tokens} and {window}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64) or None, got {seed}")
    native = _native() if backend != "python" else None
    if backend == "native" and native is None:
        raise ValueError("backend='native' but the native extension mpo._native is not built")
    if native is not None:
        return native.plan_packing(np.asarray(lengths, dtype=np.int64), int(max_tokens), seed, int(window))
    values = [int(x) for x in lengths]
    for i, length in enumerate(values):
        if not 0 < length <= max_tokens:
            raise ValueError(f"length {length} at index {i} is outside 1..{max_tokens} (max_tokens)")
    return plan_packing_python(values, int(max_tokens), seed, int(window))
