"""The DeepSpeed engine for the policy: config, model loading, freezing, optimizer, schedule.

Under ZeRO-3 the model is loaded while transformers' HfDeepSpeedConfig is alive, so
from_pretrained materialises every parameter already partitioned (a model larger than one GPU
never exists whole on one). The optimizer is torch's AdamW (fused on CUDA) handed to DeepSpeed;
weight decay skips biases and norm weights; the learning rate warms up linearly, then decays.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mpo.distributed import Dist
from mpo.families import family_of
from mpo.losses import RewardShift
from mpo.models import sequence_parallel
from mpo.models.fused_head import PolicyWithLoss
from mpo.models.loading import DTYPES, load_model, logit_softcap
from mpo.models.lora import add_lora
from mpo.models.moe import leaf_blocks, router_aux_coef
from mpo.models.sequence_parallel import Shard
from mpo.mpo_loss import MPOLoss
from mpo.train.config import Config


def train_dtype(cfg: Config, dist: Dist) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if dist.device.type == "cuda" else torch.float32
    return DTYPES[cfg.model.dtype]


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def deepspeed_config(cfg: Config, dtype: torch.dtype) -> dict:
    """The DeepSpeed config this run uses: one packed row per micro-batch; the trainer marks
    accumulation boundaries itself (rows per step vary) and normalises the loss globally."""
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.config:
        path = Path(cfg.deepspeed.config)
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed.config: file not found: {path}")
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"deepspeed.config: {path}:{e.lineno}: {e.msg}") from e
        _check_owned(extra, config, path)
        _merge(config, extra)
    return config


_ABSENT = object()
# DeepSpeed entries the trainer derives from its own config (and relies on elsewhere: ZeRO-3 loading,
# checkpoint layout, loss normalisation); a JSON may repeat them but not change them.
OWNED = {("zero_optimization", "stage"): "deepspeed.zero_stage", ("bf16", "enabled"): "model.dtype",
         ("fp16", "enabled"): "model.dtype", ("train_micro_batch_size_per_gpu",): "train.max_tokens_per_row",
         ("gradient_accumulation_steps",): "train.global_batch_pairs",
         ("train_batch_size",): "train.global_batch_pairs",
         ("gradient_clipping",): "optim.max_grad_norm", ("optimizer",): "the optim section",
         ("scheduler",): "the optim section"}


def _check_owned(extra: dict, generated: dict, path: Path) -> None:
    if not isinstance(extra, dict):
        raise ValueError(f"deepspeed.config: {path} must hold a JSON object, got {type(extra).__name__}")
    for section in {keys[0] for keys in OWNED if len(keys) > 1} | {"zero_optimization"}:
        # e.g. {"zero_optimization": true}, which DeepSpeed reads as stage 1 whatever zero_stage says
        if section in extra and not isinstance(extra[section], dict):
            raise ValueError(f"deepspeed.config: {path}: {section} must be an object, got {extra[section]!r}")
    for keys, instead in OWNED.items():
        value, mine = extra, generated
        for k in keys:
            value = value.get(k, _ABSENT) if isinstance(value, dict) else _ABSENT
            mine = mine.get(k, _ABSENT) if isinstance(mine, dict) else _ABSENT
        if value is not _ABSENT and value != mine:
            # the optimizer, scheduler and train_batch_size are not in the generated config: no value to show
            mine = "" if mine is _ABSENT else f" ({mine!r})"
            raise ValueError(f"deepspeed.config: {path} sets {'.'.join(keys)} = {value!r}, but this run derives it"
                             f"{mine} from {instead}: set that instead")



ROLES = ("language", "vision", "projector")


def param_groups(module: torch.nn.Module, weight_decay: float, roles: dict[int, str] | None = None,
                 lrs: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters in groups by role (`roles`: parameter id -> vision / projector; the rest
    is the language model) at the role's learning rate (`lrs`), matrices with weight decay, biases
    and norms without; language groups first. Under ZeRO-3 a parameter is an empty shard; its
    `ds_shape` is the real shape."""
    roles, lrs = roles or {}, lrs or {}
    groups = {(role, decay): [] for role in ROLES for decay in (True, False)}
    for p in module.parameters():
        if p.requires_grad:
            groups[roles.get(id(p), "language"), len(getattr(p, "ds_shape", p.shape)) >= 2].append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             **({"lr": lrs[role]} if role in lrs else {})} for (role, decay), params in groups.items() if params]


def role_lrs(model, cfg: Config) -> tuple[dict[int, str], dict[str, float]]:
    """(parameter id -> role, role -> peak learning rate) from the model family's module roles."""
    parts = family_of(model.config).parts(model)
    lrs = {"language": cfg.optim.lr}
    for role in ("vision", "projector"):
        lr = getattr(cfg.optim, f"{role}_lr")
        if lr is not None and not parts[role]:
            raise ValueError(f"optim.{role}_lr: {type(model).__name__} has no {role} part")
        lrs[role] = cfg.optim.lr if lr is None else lr
    roles = {id(p): role for role in ("vision", "projector") for m in parts[role] for p in m.parameters()}
    return roles, lrs


def freeze(model, cfg: Config) -> None:
    """Freeze the parts the config names (the model family's vision tower, projector and language
    model; the LM head belongs to the language model)."""
    parts = family_of(model.config).parts(model)
    for name in ("vision", "projector", "language"):
        if getattr(cfg.model, f"freeze_{name}"):
            modules = parts[name]
            if not modules:
                raise ValueError(f"model.freeze_{name}: {type(model).__name__} has no {name} part")
            for m in modules:
                m.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model.freeze_*: every parameter is frozen; nothing would train")


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def enable_sequence_parallel(cfg: Config, dist: Dist) -> Shard:
    """Split rows over groups of train.sequence_parallel_size ranks (`mpo.models.sequence_parallel`);
    refused, with the reason, where that cannot work yet."""
    from transformers import AutoConfig

    size = cfg.train.sequence_parallel_size
    if cfg.deepspeed.zero_stage != 3:
        raise ValueError(f"train.sequence_parallel_size {size} needs deepspeed.zero_stage 3: the loss scale relies "
                         "on ZeRO-3 averaging gradients over every rank (stages 0-2 average over data ranks only)")
    config = AutoConfig.from_pretrained(cfg.model.path)
    reference = cfg.loss.reference_model
    if reference and cfg.loss.reference == "online":
        text, other = config.get_text_config(), AutoConfig.from_pretrained(reference).get_text_config()
        heads = ("num_attention_heads", "num_key_value_heads", "hidden_size")
        if [getattr(text, h, None) for h in heads] != [getattr(other, h, None) for h in heads]:
            raise ValueError(f"loss.reference_model {reference}: its attention heads differ from model.path's; with "
                             "train.sequence_parallel_size every model of the run shares one head split")
    return sequence_parallel.enable(cfg.model.path, size, dist)


def build(cfg: Config, dist: Dist, total_steps: int, dtype: torch.dtype, ds_config: dict, *,
          shard: Shard | None = None):
    """-> (engine, scheduler): the policy wrapped with its fused loss (`deepspeed_config(cfg, dtype)`);
    `shard`: this rank's part of each row (sequence parallelism, `enable_sequence_parallel`)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = cfg.deepspeed.zero_stage == 3
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None
    model = load_model(cfg.model.path, dtype=dtype, device="cpu" if zero3 else dist.device,
                       load_in_4bit=cfg.model.load_in_4bit)
    del keep_alive
    freeze(model, cfg)
    lora = None
    if cfg.lora.r:
        c = cfg.lora
        lora = add_lora(model, c.r, c.alpha, c.dropout, c.target_modules, c.modules_to_save)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shift = RewardShift(cfg.loss.reward_shift, cfg.loss.reward_shift_momentum)
    criterion = MPOLoss(cfg.loss.beta, cfg.loss.types, cfg.loss.weights, shift, update_shift=False,
                        label_smoothing=cfg.loss.label_smoothing, sft_normalization=cfg.loss.sft_normalization,
                        softcap=logit_softcap(model), impl=cfg.loss.impl,
                        sequence_group=None if shard is None else shard.group)
    if zero3:
        leaf_blocks(model)
    policy = PolicyWithLoss(model, criterion, zero3=zero3, attention=cfg.model.attention, lora=lora, shard=shard,
                            router_aux_coef=router_aux_coef(model, cfg.loss.router_aux_coef))

    roles, lrs = role_lrs(model, cfg)
    optimizer = torch.optim.AdamW(param_groups(policy, cfg.optim.weight_decay, roles, lrs), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=dist.device.type == "cuda" and not cfg.deepspeed.offload_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule))
    engine, _, _, scheduler = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config,
                                                   mpu=None if shard is None else sequence_parallel.mpu())
    return engine, scheduler
