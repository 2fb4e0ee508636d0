"""`mpo plot RUN_DIR`: draw a run's metrics.jsonl curves (train and eval) to a PNG."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = ("loss", "rewards/accuracies", "rewards/margins", "reward_shift", "logps/chosen", "lr")


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("mpo plot needs matplotlib: pip install matplotlib") from e
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: {e.msg}") from None
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, name in zip(axes.flat, PANELS):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[name]) for r in rows
                      if r.get("split") == split and isinstance(r.get(name), (int, float))]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
