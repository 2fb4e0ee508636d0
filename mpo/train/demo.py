"""The built-in demo run: `mpo train` with no config.

A tiny InternVL-architecture model (or, with `mpo train --demo-arch`, a tiny Qwen2-VL, Qwen2.5-VL
or Qwen3-VL) and the demo preference set are generated (once) into a cache folder ($MPO_CACHE,
default ~/.cache/mpo/demo). MPO is meant for an instruction-tuned model (the
paper starts from InternVL2-8B), so the demo runs in two stages on the CPU, a few minutes in all:
  1. warm-up: SFT on the chosen responses (loss sft only) -> <run>/warmup/final;
  2. MPO (sigmoid + bco_pair + sft, paper weights) from that model, which is also the reference.
It reports held-out reward accuracy before and after stage 2. (From a random model the rewards
grow by tens of nats as the language is learnt, and the cumulative BCO reward shift lags far
behind them, pushing every rejected token down against the SFT term.)
configs/demo_warmup.yaml and configs/demo.yaml are the same two runs as config files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mpo.train.config import Config, load_config

COMMON = ["model.dtype=fp32", "train.device=cpu", "deepspeed.zero_stage=0", "train.global_batch_pairs=16",
          "train.max_tokens_per_row=2048", "optim.weight_decay=0.0", "optim.warmup_ratio=0.05",
          "checkpoint.keep_last=1", "logging.report_to=[]"]
WARMUP = ["loss.types=[sft]", "loss.weights=[1.0]", "optim.lr=0.003", "train.max_steps=150"]
MPO = ["optim.lr=0.002", "train.max_steps=400", "train.eval_every=200"]


def cache_dir() -> Path:
    return Path(os.environ.get("MPO_CACHE", Path.home() / ".cache" / "mpo")) / "demo"


def prepare(root: Path, arch: str = "internvl") -> tuple[Path, Path]:
    """The tiny model and demo data under `root`, generated when missing."""
    from mpo.data.demo import write_demo_data
    from mpo.models.tiny import build_tiny_model

    model, data = root / f"tiny-{arch}", root / "data"
    if not (model / "config.json").is_file():
        build_tiny_model(model, arch)
    if not (data / "meta.json").is_file():
        write_demo_data(data, force=data.exists())
    return model, data


def demo_configs(overrides: list[str] = (), run_dir: str | None = None,
                 arch: str = "internvl") -> tuple[Config, Config]:
    """(warm-up config, MPO config); overrides apply to both stages."""
    model, data = prepare(cache_dir(), arch)
    run = Path(run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    warm = load_config(None, [f"model.path={model}", f"data.train={data / 'meta.json'}",
                              f"train.output_dir={run / 'warmup'}", *COMMON, *WARMUP, *overrides])
    mpo = load_config(None, [f"model.path={run / 'warmup' / 'final'}", f"data.train={data / 'meta.json'}",
                             f"data.eval={data / 'meta_heldout.json'}", f"train.output_dir={run}",
                             *COMMON, *MPO, *overrides])
    return warm, mpo


def run_demo(overrides: list[str] = (), run_dir: str | None = None, resume: bool = False,
             arch: str = "internvl") -> tuple[dict, bool]:
    """Both stages (the warm-up is skipped when its model exists); -> (MPO summary, is main rank)."""
    from mpo.train.trainer import Trainer

    warm, mpo = demo_configs(overrides, run_dir, arch)
    if not (Path(mpo.model.path) / "config.json").is_file():
        Trainer(warm, warm.train.output_dir).run()
    trainer = Trainer(mpo, mpo.train.output_dir, resume=resume)
    return trainer.run(), trainer.dist.main


def summary_table(summary: dict, *, demo: bool = False) -> str:
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    rows = [("held-out reward accuracy", "rewards/accuracies", "{:.2f}"),
            ("held-out reward margin", "rewards/margins", "{:.3f}"),
            ("held-out loss", "loss", "{:.4f}"),
            ("held-out answer accuracy", "accuracy", "{:.3f}")]
    lines = [f"{'':28}{'before':>10}{'after':>10}"] if before or after else []
    for label, key, fmt in rows:
        if key not in before and key not in after:
            continue
        cells = [fmt.format(d[key]) if key in d else "-" for d in (before, after)]
        lines.append(f"{label:28}{cells[0]:>10}{cells[1]:>10}")
    lines.append(f"run directory: {summary['run_dir']}" + (" (SFT warm-up in warmup/)" if demo else "")
                 + (f"   final model: {summary['final']}" if "final" in summary else ""))
    if summary.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite): {summary['skipped_steps']}")
    return "\n".join(lines)
