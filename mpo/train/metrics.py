"""Run metrics: metrics.jsonl, TensorBoard and Weights & Biases, a progress bar, throughput and MFU.

Every logged row is one JSON object in <run>/metrics.jsonl with `step`, `split` ("train" or
"eval") and the metric names (TRL's: loss, loss/<type>, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; plus reward_shift, lr, pairs,
pairs/s, tokens/s/gpu, mfu, peak_memory_gb, skipped_steps; a mixture of experts trained with its
load-balancing loss adds loss/router_aux and router/idle_experts, the share of (layer, expert) pairs
no token of a row chose, both pair-weighted means over rows). `logging.report_to` adds TensorBoard
(when installed) and W&B, which get the same names under `<split>/` at the same step (train and
eval rows share steps). Only rank 0 writes.

The W&B run's id is kept in <run>/wandb_id, so a resumed run continues the same W&B run; W&B's
own settings (WANDB_MODE=offline, WANDB_API_KEY, ...) come from the environment untouched.
"""

from __future__ import annotations

import importlib.util
import json
import math
import resource
import secrets
import sys
import time
from pathlib import Path

import torch

from mpo.atomic import write_text_atomic
from mpo.families import family_of
from mpo.models.moe import active_shares

# Dense bf16 peak FLOP/s by GPU name, first match wins (none known on CPUs: no MFU there).
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
              ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("B200", 2250e12))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS if k in name), None)


def flops_per_token(model: torch.nn.Module, head: torch.nn.Parameter) -> int:
    """Training FLOPs per row token counted for MFU: the language model's matmuls, 6 per trainable
    parameter (forward, input and weight gradients) and 4 per frozen one (no weight gradient), the
    LM head included, the input embeddings (a lookup), the vision tower, the projector and attention
    scores not: a lower bound. A mixture of experts counts the experts a token is routed to (its
    active parameters), not all of them."""
    parts = family_of(model.config).parts(model)
    skip = {id(p) for m in parts["vision"] + parts["projector"] for p in m.parameters()}
    skip.add(id(model.get_input_embeddings().weight))
    shares = active_shares(model)
    total = 0.0
    for p in model.parameters():  # a tied LM head is listed once, as the embeddings
        if p is head or id(p) not in skip:
            total += (6 if p.requires_grad else 4) * getattr(p, "ds_numel", p.numel()) * shares.get(id(p), 1.0)
    return round(total)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on this device, or this process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reporters(report_to: list[str], *, main: bool) -> list[str]:
    """The reporters of `logging.report_to` that will run. A missing wandb is refused (a run that asks
    for it is watched there); a missing TensorBoard, the default, is said once on rank 0 and skipped."""
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ImportError("logging.report_to names wandb, which is not installed: pip install wandb "
                          "(or drop it from logging.report_to)")
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        if main:
            print("mpo: logging.report_to names tensorboard, which is not installed: metrics go to metrics.jsonl "
                  "only (pip install tensorboard, or logging.report_to=[] to silence this)", file=sys.stderr)
        return [r for r in report_to if r != "tensorboard"]
    return list(report_to)


def wandb_run(run_dir: Path, project: str, config: dict):
    """A W&B run for this run folder: the id stored there, or a new one stored for a resume."""
    import wandb

    id_file = run_dir / "wandb_id"
    if id_file.is_file():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = secrets.token_hex(6)
        write_text_atomic(id_file, run_id + "\n")
    return wandb.init(project=project or "mpo", name=run_dir.name, dir=str(run_dir), config=config,
                      resume="allow", id=run_id)


class MetricsLog:
    def __init__(self, run_dir: Path, *, main: bool, total_steps: int, start_step: int, report_to: list[str],
                 progress: bool, config: dict | None = None, wandb_project: str = ""):
        self.main, self.total = main, total_steps
        self.path = run_dir / "metrics.jsonl"
        self.writer = self.bar = self.wandb = None
        if not main:
            return
        if start_step and self.path.is_file():  # resumed: rows logged after the checkpoint are redone
            kept = [line for line in self.path.read_text(encoding="utf-8").split("\n")
                    if line and json.loads(line)["step"] <= start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            self.wandb = wandb_run(run_dir, wandb_project, config or {})
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="mpo train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.main:
            return
        row = {"step": step, "split": split, "time": round(time.time(), 3), **metrics}
        # strict JSON: a non-finite value (a skipped step's loss) is null, not NaN
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)
        if self.bar is not None and split == "train":
            waited = metrics.get("data_wait_s/max", metrics.get("data_wait_s", 0.0))  # the slowest rank's
            wait = waited / max(metrics.get("step_s", 1.0), 1e-9)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
                                 data_wait=f"{100 * wait:.0f}%", refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
