"""The MPO training loop on DeepSpeed.

One optimizer step = `global_batch_pairs` pairs, packed into rows and dealt to ranks; every rank
runs the same number of micro-batches (blank rows pad the short ones: ZeRO gathers parameters
collectively). Each micro-batch's loss is its share of the step's loss, normalised by the step's
global pair and chosen-token counts, and multiplied by the world size because DeepSpeed averages
gradients over ranks: the loss and its gradient do not depend on how a step is split.

The reward shift is folded in once per optimizer step, with the step's mean reward over all its
pairs; the step itself uses the shift of the steps before it. (The MPO authors' code folds in each
micro-batch's mean before using it, which makes the loss depend on the micro-batch split; a
split-invariant loss needs the one-step lag.)

A step is skipped, counted and never applied when its gradients are not finite on any rank (a
non-finite loss makes them so): ZeRO stages 1-3 find it in DeepSpeed's gradient-norm check, which
also drops every gradient the step accumulated; at stage 0 the trainer checks the gradients and
all ranks agree. Too many in a row stop the run.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mpo.data.dataset import PairDataset
from mpo.data.formats import DataSource
from mpo.data.index import rendering_options
from mpo.data.packing import PackedBatch, PackingOptions
from mpo.data.records import Rejects
from mpo.data.render import ImageOptions
from mpo.distributed import Dist, Phase, barrier, init
from mpo.families import family_of
from mpo.models.loading import lm_head
from mpo.models.moe import parameter_counts
from mpo.models.quantized import require_4bit
from mpo.train import checkpoint, export
from mpo.train.config import Config, dump, saved_in_current_keys
from mpo.train.data import TrainPlan
from mpo.train.engine import build, deepspeed_config, enable_sequence_parallel, role_lrs, train_dtype
from mpo.train.generation_eval import GenerationEval
from mpo.train.metrics import MetricsLog, flops_per_token, peak_flops, peak_memory_gb, reporters
from mpo.train.reference import BaseReference, ReferenceModel, base_is_reference, build_cache, cache_key, load_cache
from mpo.train.run_lock import RunLock

# Accumulated per micro-batch as sums, then divided by the step's pair count (MEANS) or not (loss/sft).
MEANS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """train=False sets up the data and reference caches only (`mpo ref-logps`)."""

    def __init__(self, cfg: Config, output_dir: str | Path, *, resume: bool = False, train: bool = True):
        self.cfg, self.run_dir, self.resume = cfg, Path(output_dir), resume
        self.dist: Dist = init(cfg.train.device)
        seed_everything(cfg.train.seed + self.dist.rank)
        if cfg.model.load_in_4bit:
            require_4bit(self.dist.device)
        self.report_to = reporters(cfg.logging.report_to, main=self.dist.main) if train else []
        self.lock = self._take_run_folder(train)
        # sequence parallelism: groups of N consecutive ranks share each row, one data rank per group
        sp = cfg.train.sequence_parallel_size
        self.shard = enable_sequence_parallel(cfg, self.dist) if sp > 1 else None
        self.data_rank, self.data_world = self.dist.rank // sp, self.dist.world // sp
        self.packing = PackingOptions(cfg.data.packing, cfg.train.max_tokens_per_row * sp, cfg.data.overlong)
        # rank 0 indexes the data and lists the rejected records; a resumed run (whose index is
        # already there) keeps the first start's list as it is
        listed = self.dist.main and not resume
        self.rejects = Rejects(self.run_dir / "rejects.jsonl" if listed else None, strict=cfg.data.strict)
        self.images = ImageOptions(cfg.data.max_patches, cfg.data.min_pixels, cfg.data.max_pixels,
                                   cfg.data.max_image_pixels)
        self.rendering = rendering_options(self.packing, self.images)
        self.train_pairs = self._pairs("train", cfg.data.train)
        self.eval_pairs = self._pairs("eval", cfg.data.eval) if cfg.data.eval else None
        self.plan = TrainPlan(self.train_pairs, seed=cfg.train.seed, global_batch_pairs=cfg.train.global_batch_pairs,
                              window=cfg.data.shuffle_window)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.plan.steps_per_epoch
        self.dtype = train_dtype(cfg, self.dist)
        self.ds_config = deepspeed_config(cfg, self.dtype)
        self.online, self.ref, self.base_reference = None, {}, False
        self._prepare_reference()
        self.generation_eval = None
        if train:
            self._build_training()

    def _build_training(self) -> None:
        """The engine (policy, optimizer, scheduler) and what training needs beside it."""
        # the random stream of training (adapter initialisation, dropout) starts here, the same
        # whether a reference cache was just built (its loader draws seeds), loaded, or not used
        cfg = self.cfg
        seed_everything(cfg.train.seed + self.dist.rank)
        self.engine, self.scheduler = build(cfg, self.dist, self.total_steps, self.dtype, self.ds_config,
                                            shard=self.shard)
        self.policy = self.engine.module
        if self.base_reference:
            self.online = BaseReference(self.policy.model, zero_stage=cfg.deepspeed.zero_stage,
                                        attention=cfg.model.attention, impl=cfg.loss.impl, shard=self.shard)
        self.flops_per_token = flops_per_token(self.policy.model, lm_head(self.policy.model).weight)
        if cfg.data.eval_prompts:
            self.generation_eval = GenerationEval(
                cfg.data.eval_prompts, model_dir=cfg.model.path, images=self.images,
                image_root=cfg.data.image_root or None, allow_outside_root=cfg.data.allow_outside_root,
                dist=self.dist, max_new_tokens=cfg.train.eval_max_new_tokens, batch_size=cfg.train.eval_batch_size,
                synced=self.dist.world > 1 and cfg.deepspeed.zero_stage == 3)

    def _take_run_folder(self, train: bool) -> RunLock | None:
        """Lock the run folder (rank 0), check it holds what the command expects, write the config."""
        lock = None
        # before anything reads or changes the folder; a phase, so that a refusal on rank 0 ends every rank
        with Phase(self.dist, f"taking the run folder {self.run_dir}"):
            # a resume of a folder that is not there is refused below, without creating it
            if self.dist.main and (not self.resume or self.run_dir.is_dir()):
                lock = RunLock(self.run_dir)
        found = checkpoint.checkpoints(self.run_dir) if self.run_dir.exists() else []
        if train and found and not self.resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run "
                             "or choose another --output-dir")
        if self.resume and not found:
            raise ValueError(f"--resume: no checkpoint-<step> folder in {self.run_dir}")
        if self.resume:
            checkpoint.verify(found[-1], self.dist)
            _check_resumable(self.cfg, found[-1])
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_partial(self.run_dir)
            if train:
                dump(self.cfg, self.run_dir / "config.yaml")
        barrier()
        return lock

    def _pairs(self, split: str, data: str) -> PairDataset:
        """The split's pairs: the matching index, or one all ranks build together (each measures its
        share; rank 0 merges and writes it)."""
        cfg = self.cfg
        source = DataSource(data, image_root=cfg.data.image_root or None,
                            allow_outside_root=cfg.data.allow_outside_root)
        with Phase(self.dist, f"indexing the {split} data ({data})") as phase:
            return PairDataset.open(cfg.model.path, source, self.packing, self.rejects, images=self.images,
                                    index_dir=cfg.data.index_dir or self.run_dir, workers=cfg.data.num_workers,
                                    group=phase)

    # --- reference log-probs ------------------------------------------------------------------------------

    def cache_path(self, split: str) -> Path:
        base = Path(self.cfg.loss.reference_cache) if self.cfg.loss.reference_cache else \
            self.run_dir / "reference_logps.safetensors"
        return base if split == "train" else base.with_name(base.stem + ".eval" + base.suffix)

    def _reference_model(self) -> ReferenceModel:
        return ReferenceModel(self.cfg.loss.reference_model or self.cfg.model.path, dtype=self.dtype,
                              dist=self.dist, zero_stage=self.cfg.deepspeed.zero_stage,
                              attention=self.cfg.model.attention, ds_config=self.ds_config,
                              impl=self.cfg.loss.impl, load_in_4bit=self.cfg.model.load_in_4bit, shard=self.shard)

    def _prepare_reference(self) -> None:
        """Cache mode: build missing caches (reference model loaded only for that), load and check
        them. Online mode: keep a frozen reference model for every micro-batch, or, with LoRA over
        the reference's own base, use the policy with its adapters disabled (set up once it exists)."""
        splits = {"train": self.train_pairs, **({"eval": self.eval_pairs} if self.eval_pairs else {})}
        if set(self.cfg.loss.types) == {"sft"}:
            return  # no pair loss: the reference log-probs are never used (zeros stand in)
        if self.cfg.loss.reference == "online":
            self.base_reference = base_is_reference(self.cfg)
            if not self.base_reference:
                self.online = self._reference_model()
            return
        # what the values depend on besides weights and data: rendering, packing, and the numerics
        rendering = {**self.rendering, "dtype": str(self.dtype).removeprefix("torch."),
                     "attention": self.cfg.model.attention, "device": self.dist.device.type,
                     **({"weights": "nf4"} if self.cfg.model.load_in_4bit else {})}
        model_path = self.cfg.loss.reference_model or self.cfg.model.path
        reference = None
        with Phase(self.dist, "preparing the reference log-probs") as phase:
            for split, pairs in splits.items():
                # rank 0 hashes the reference model's files
                key = phase.share(cache_key(model_path, pairs.index.key["data"], rendering) if self.dist.main
                                  else None)
                path = self.cache_path(split)
                if not phase.share(path.is_file()):
                    reference = reference or self._reference_model()
                    build_cache(pairs, reference, key, path, self.dist, self.dtype, self._loader_options(), phase,
                                data=(self.data_rank, self.data_world))
                self.ref[split] = load_cache(path, key, pairs)
        del reference

    def reference_sums(self, split: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.online is not None:
            sums, _ = self.online.sums(batch)
            return sums[0::2], sums[1::2]
        if split not in self.ref:  # an SFT-only run
            zeros = torch.zeros(batch.num_pairs, device=self.dist.device)
            return zeros, zeros
        chosen, rejected = self.ref[split]
        index = batch.pair_index.cpu()
        return chosen[index].to(self.dist.device), rejected[index].to(self.dist.device)

    # --- steps --------------------------------------------------------------------------------------------

    def _loader_options(self) -> dict:
        return {"num_workers": self.cfg.data.num_workers, "prefetch_factor": self.cfg.data.prefetch_factor,
                "pin_memory": self.dist.device.type == "cuda"}

    def _my_rows(self, dealt: list[list[tuple[int, ...]]]):
        """This rank's rows of a step, padded with blank rows to the most any rank has."""
        mine = dealt[self.data_rank]
        return [mine[k] if k < len(mine) else () for k in range(max(len(rows) for rows in dealt))]

    def train_batches(self, start: int) -> Iterator[PackedBatch]:
        """This rank's micro-batches from step `start` to the end, in step order: one loader, which
        reads ahead across steps."""
        rows = (row for step in range(start, self.total_steps)
                for row in self._my_rows(self.plan.rows(step, self.data_world)[1]))
        return iter(self.train_pairs.loader(rows, **self._loader_options()))

    def _per_pair(self, name: str) -> bool:
        """Metrics that are means over pairs (summed x pairs, divided by the global count); a
        token-normalised SFT term is already normalised by the step's global chosen-token count,
        so it adds up as it is."""
        token_sft = name == "loss/sft" and self.cfg.loss.sft_normalization == "token"
        return name in MEANS or name.startswith("router/") or (name.startswith("loss/") and not token_sft)

    def _metric_sums(self, names: list[str], loss, metrics: dict, batch, scale: float) -> torch.Tensor:
        """One micro-batch's contribution to the step's metrics, kept on the device (no sync)."""
        zero = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        out = []
        for name in names:
            if name == "loss":
                value = loss.detach().double() / scale
            elif name == "row_tokens":
                value = zero + batch.num_tokens * (batch.num_pairs > 0)
            elif name in metrics:
                value = metrics[name].detach().to(zero) * (batch.num_pairs if self._per_pair(name) else 1)
            else:
                value = zero
            out.append(value.reshape(()))
        return torch.stack(out)

    def _summed_over_ranks(self, sums: torch.Tensor, names: list[str], pair_count: int) -> dict:
        """Sum the metric sums over ranks and divide the means by the pair count: one sync. (The
        ranks of a sequence-parallel group each count their row's pairs and tokens.)"""
        torch.distributed.all_reduce(sums)
        sums /= self.cfg.train.sequence_parallel_size
        return {n: v / pair_count if self._per_pair(n) else v for n, v in zip(names, sums.tolist())}

    def _gradients_finite(self) -> bool:
        """ZeRO stage 0 keeps plain gradients and steps a plain optimizer: check them (all ranks agree)."""
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True
        flag = torch.tensor([1.0 if finite else 0.0], device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def metric_names(self, *, with_row_tokens: bool = True) -> list[str]:
        """The metrics summed per micro-batch; row_tokens (for the rates) only in training."""
        aux = ["loss/router_aux", "router/idle_experts"] * bool(self.policy.router_aux_coef)
        return ["loss", *(f"loss/{t}" for t in self.cfg.loss.types), *aux, *MEANS, *["row_tokens"] * with_row_tokens]

    def forward_backward(self, batch, *, pair_count: int, chosen_tokens: int, last: bool) -> torch.Tensor:
        """One micro-batch: its share of the step's loss, backward; -> its metric sums (on the device).
        Always backward: a non-finite loss makes non-finite gradients, and the step is then skipped
        as a whole (optimizer_step), with every accumulated gradient of the step dropped."""
        ref_c, ref_r = self.reference_sums("train", batch)
        self.engine.set_gradient_accumulation_boundary(last)
        loss, metrics = self.engine(batch, ref_c, ref_r, pair_count=pair_count, chosen_token_count=chosen_tokens,
                                    scale=self.dist.world)
        self.engine.backward(loss, scale_wrt_gas=False)
        return self._metric_sums(self.metric_names(), loss, metrics, batch, self.dist.world)

    def optimizer_step(self) -> bool:
        """Apply the step's gradients unless they are not finite on some rank; -> applied. The loss
        then folds the step's rewards into its reward shift (applied steps only)."""
        if self.cfg.deepspeed.zero_stage == 0 and not self._gradients_finite():
            self.engine.optimizer.zero_grad()
            applied = False
        else:  # ZeRO 1-3 check the gradient norm themselves and skip (and clear) a non-finite step
            self.engine.step()
            applied = self.engine.was_step_applied()
        self.policy.end_step(applied)
        return applied

    def train_step(self, step: int, batches: Iterator[PackedBatch]) -> dict:
        """Step `step` on its micro-batches, the next ones of `batches` (`train_batches`) -> its metrics."""
        start = time.perf_counter()
        pairs, dealt = self.plan.rows(step, self.data_world)
        pair_count, tokens = len(pairs), self.train_pairs.chosen_tokens(pairs)
        delta = self.policy.reward_shift.value
        sums, rounds, waited = 0, max(len(rows) for rows in dealt), 0.0
        self.engine.train()
        for k in range(rounds):
            ready = time.perf_counter()
            batch = next(batches).to(self.dist.device, self.dtype)
            waited += time.perf_counter() - ready
            sums = sums + self.forward_backward(batch, pair_count=pair_count, chosen_tokens=tokens,
                                                last=k == rounds - 1)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on in step())
        applied = self.optimizer_step()
        out = self._summed_over_ranks(sums, self.metric_names(), pair_count)
        if self.dist.world > 1:  # one slow reader holds every rank back at the step's collectives
            longest = torch.tensor([waited], dtype=torch.float64, device=self.dist.device)
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
            out["data_wait_s/max"] = longest.item()
        return self._step_metrics(out, seconds=time.perf_counter() - start, waited=waited, reward_shift=delta, lr=lr,
                                  pairs=pair_count, applied=applied)

    def _step_metrics(self, out: dict, *, seconds: float, waited: float, reward_shift: float, lr: float, pairs: int,
                      applied: bool) -> dict:
        """A train row of metrics.jsonl: the step's loss metrics, then its rates and resources."""
        out.update({"reward_shift": reward_shift, "lr": lr, "pairs": pairs, "step_s": seconds, "data_wait_s": waited,
                    "pairs/s": pairs / seconds, "tokens/s/gpu": out["row_tokens"] / seconds / self.dist.world,
                    "peak_memory_gb": peak_memory_gb(self.dist.device), "step_applied": applied})
        peak = peak_flops(self.dist.device)
        if peak:
            out["mfu"] = self.flops_per_token * out["row_tokens"] / seconds / (peak * self.dist.world)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        pairs, names = self.eval_pairs, self.metric_names(with_row_tokens=False)
        rows = self._my_rows(pairs.deal(pairs.data_order_rows(), self.data_world))
        pair_count, tokens = len(pairs.valid), pairs.chosen_tokens(pairs.valid)
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.dist.device)
        self.engine.eval()
        for batch in pairs.loader(rows, **self._loader_options()):
            batch = batch.to(self.dist.device, self.dtype)
            ref_c, ref_r = self.reference_sums("eval", batch)
            loss, metrics = self.engine(batch, ref_c, ref_r, pair_count=pair_count, chosen_token_count=tokens)
            sums += self._metric_sums(names, loss, metrics, batch, 1.0)
        self.engine.train()
        return {**self._summed_over_ranks(sums, names, pair_count), "pairs": pair_count}

    def _evaluations(self, step: int, *, scheduled: bool) -> dict:
        """The held-out pair metrics and the generation accuracy due at this step (all at the start and
        the end, `scheduled` ones in between)."""
        cfg, out = self.cfg, {}
        if self.eval_pairs is not None and (not scheduled or cfg.train.eval_every and step % cfg.train.eval_every == 0):
            out.update(self.evaluate())
        every = cfg.train.eval_generation_every
        if self.generation_eval is not None and (not scheduled or every and step % every == 0):
            out.update(self.generation_eval(self.policy.model, self.dtype, self.run_dir, step))
        return out

    # --- the run ------------------------------------------------------------------------------------------

    def _state(self, step: int, skipped: int, consecutive: int) -> dict:
        return {"step": step, "skipped_steps": skipped, "consecutive_skipped": consecutive,
                "config": self.cfg.to_dict(), "world_size": self.dist.world, "scheduler": self.scheduler.state_dict(),
                "reward_shift": self.policy.reward_shift.state_dict()}

    def startup_summary(self) -> str:
        """One line on what this run trains, with what, at which learning rates."""
        cfg, model = self.cfg, self.policy.model
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        total, active = parameter_counts(model)
        lrs = role_lrs(model, cfg)[1]
        family = family_of(model.config)
        rates = ", ".join(f"{role} {lrs[role]:g}" for role in (("language", "vision", "projector") if family.vision
                                                                else ("language",)))
        return (f"mpo train: {cfg.model.path} ({family.name}, {str(self.dtype).removeprefix('torch.')}, "
                f"ZeRO-{cfg.deepspeed.zero_stage}, {self.dist.world} rank{'s' * (self.dist.world > 1)}); "
                f"{len(self.train_pairs.valid)} pairs, {self.total_steps} steps of {cfg.train.global_batch_pairs}; "
                f"peak lr {rates}; {trainable / 1e6:.3g}M of {total / 1e6:.3g}M parameters trained"
                + (f" ({active / 1e6:.3g}M active per token)" if active < total else ""))

    def run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        step, skipped, consecutive = self._restore() if self.resume else (0, 0, 0)
        if dist.main:
            print(self.startup_summary(), file=sys.stderr, flush=True)
        log = MetricsLog(self.run_dir, main=dist.main, total_steps=self.total_steps, start_step=step,
                         report_to=self.report_to, progress=cfg.logging.progress, config=cfg.to_dict(),
                         wandb_project=cfg.logging.wandb_project)
        summary = {"run_dir": str(self.run_dir), "steps": self.total_steps, "train_pairs": len(self.train_pairs.valid),
                   "rejected": self.train_pairs.rejected}
        if not self.resume:
            summary["eval_before"] = self._evaluate_and_log(log, step, scheduled=False)
        batches = self.train_batches(step)
        try:
            while step < self.total_steps:
                metrics = self.train_step(step, batches)
                step += 1
                skipped, consecutive = self._count_skipped(metrics["step_applied"], step, skipped, consecutive)
                if step % cfg.logging.every_steps == 0 or step == self.total_steps:
                    log.log(step, "train", {**metrics, "skipped_steps": skipped})
                log.advance()
                if step < self.total_steps:
                    self._evaluate_and_log(log, step, scheduled=True)
                    if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                        self._save(step, skipped, consecutive)
            summary["eval_after"] = self._evaluate_and_log(log, step, scheduled=False)
        finally:
            batches = None  # stops the loader's workers
            log.close()
            self.rejects.close()
        if skipped == step:
            raise RuntimeError(f"every one of the {step} steps had a non-finite loss or gradient and was skipped: "
                               "nothing was trained, no final model exported. Lower optim.lr or check the data.")
        self._save(step, skipped, consecutive)
        if cfg.checkpoint.export_final:
            summary["final"] = str(export.export_final(
                self.engine, Path(cfg.model.path), self.run_dir, dist, zero_stage=cfg.deepspeed.zero_stage,
                max_shard_bytes=int(cfg.checkpoint.export_shard_gb * 1e9)))
        summary["skipped_steps"] = skipped
        self.release()
        return summary

    def _restore(self) -> tuple[int, int, int]:
        """Load the latest checkpoint -> (step, skipped steps, consecutive skipped steps)."""
        state = checkpoint.load(self.engine, checkpoint.checkpoints(self.run_dir)[-1], self.dist,
                                zero_stage=self.cfg.deepspeed.zero_stage)
        self.scheduler.load_state_dict(state["scheduler"])
        self.policy.reward_shift.load_state_dict(state["reward_shift"])
        return state["step"], state["skipped_steps"], state["consecutive_skipped"]

    def _count_skipped(self, applied: bool, step: int, skipped: int, consecutive: int) -> tuple[int, int]:
        if applied:
            return skipped, 0
        if consecutive + 1 >= self.cfg.optim.max_skipped_steps:
            raise RuntimeError(f"{consecutive + 1} consecutive steps had a non-finite loss or gradient "
                               f"(last: step {step}); stopping. Lower optim.lr or check the data.")
        return skipped + 1, consecutive + 1

    def _evaluate_and_log(self, log: MetricsLog, step: int, *, scheduled: bool) -> dict:
        out = self._evaluations(step, scheduled=scheduled)
        if out:
            log.log(step, "eval", out)
        return out

    def _save(self, step: int, skipped: int, consecutive: int) -> None:
        checkpoint.save(self.engine, self.run_dir, step, self._state(step, skipped, consecutive), self.dist,
                        zero_stage=self.cfg.deepspeed.zero_stage, keep_last=self.cfg.checkpoint.keep_last)

    def release(self) -> None:
        """Give the run folder up now, not when the process ends: a later command in this process may take it."""
        if self.lock is not None:
            self.lock.close()


# What may change between a run and its resumption: where and how often it reports and saves.
RESUME_MAY_CHANGE = ("train.output_dir", "train.eval_", "data.eval", "data.strict", "logging.", "checkpoint.")


def _check_resumable(cfg: Config, ckpt: Path) -> None:
    """An exact resume replays the same plan: refuse a config that would change it."""
    saved = json.loads((ckpt / "trainer.json").read_text()).get("config")
    if saved is None:
        return
    saved = saved_in_current_keys(saved)  # an older version's: a key renamed, or added and at its default, is no change
    now = cfg.to_dict()
    changed = [f"{section}.{key}" for section in now for key in now[section]
               if saved.get(section, {}).get(key) != now[section][key]
               and not f"{section}.{key}".startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise ValueError(f"--resume: the config differs from the one {ckpt} was trained with in "
                         f"{', '.join(changed)}; resume with the run's config.yaml (only logging, checkpoint, "
                         "evaluation and the output folder may change)")


def reference_caches(cfg: Config) -> dict[str, Path]:
    """Build (when missing) and check the reference caches of a config: {split: path}."""
    if cfg.loss.reference != "cache":
        raise ValueError("loss.reference is 'online': there is no reference cache to build")
    setup = Trainer(cfg, cfg.train.output_dir, train=False)
    setup.release()
    return {split: setup.cache_path(split) for split in setup.ref}
