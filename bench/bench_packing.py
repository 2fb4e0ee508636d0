"""Time the packing planner (native vs Python) and report how full its rows are.

Inputs: MMPR-scale per-pair token costs (3M by default) drawn from a log-normal fitted by eye to
multimodal pairs (median ~1100 tokens: image tokens + question + two responses), clipped to
[min, max_tokens]. Reports seconds per backend (best of --repeat), the speed-up, whether both
backends return identical rows, and the fraction of row tokens that are real (no padding).

    python bench/bench_packing.py [--pairs 3000000] [--max-tokens 16384] [--window 4096]
"""

import argparse
import sys
import time

import numpy as np

from mpo.data.plan import plan_packing


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3_000_000)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--median", type=float, default=1100.0, help="median pair cost in tokens")
    ap.add_argument("--sigma", type=float, default=0.6, help="log-normal sigma of pair costs")
    ap.add_argument("--repeat", type=int, default=3, help="native runs (best taken); Python runs once")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(args.median), args.sigma, args.pairs), 16, args.max_tokens).astype(np.int64)
    kw = dict(seed=0, window=args.window)
    t_native, rows = timed(lambda: plan_packing(lengths, args.max_tokens, backend="native", **kw), args.repeat)
    t_python, rows_py = timed(lambda: plan_packing(lengths, args.max_tokens, backend="python", **kw), 1)
    real = lengths.sum() / (len(rows) * args.max_tokens)
    print(f"pairs {args.pairs:,}  max_tokens {args.max_tokens}  window {args.window}  "
          f"median cost {np.median(lengths):.0f}  total tokens {lengths.sum():,}")
    print(f"native {t_native:.3f} s   python {t_python:.3f} s   speed-up {t_python / t_native:.1f}x   "
          f"identical rows: {rows == rows_py}")
    print(f"rows {len(rows):,}   real tokens {100 * real:.2f}% of row capacity")
    return 0 if rows == rows_py else 1


if __name__ == "__main__":
    sys.exit(main())
