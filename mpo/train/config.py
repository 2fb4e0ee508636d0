"""Training configuration: one dataclass per section, each field with a one-line help.

A config is a YAML file of sections (model, data, loss, optim, train, deepspeed, checkpoint,
logging) overlaid on the defaults below, then `section.key=value` overrides (values parsed as
YAML scalars). Unknown sections or keys and values of the wrong type or outside their range raise
ValueError naming the key (and the file). `mpo train --help` prints every field with its help.

A key renamed since an older mpo wrote a config (`RENAMED`) is still read, as its new form, with
a one-line notice on stderr: a run folder's config.yaml stays usable, `--resume` included.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mpo.data.packing import LAYOUTS, OVERLONG
from mpo.losses import MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, RewardShift, check_loss_spec
from mpo.models.packed_attention import BACKENDS

REPORTERS = ("tensorboard", "wandb")  # logging.report_to


def opt(default, help: str, *, choices=None, low=None, high=None):
    """A config field: default, one-line help, optional allowed choices and numeric bounds."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt("", "policy model folder (HF format: weights, config, tokenizer, processor)")
    dtype: str = opt("auto", "training dtype; auto = bf16 on GPU, fp32 on CPU",
                     choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = opt(False, "recompute the backbone's activations in backward to save memory")
    freeze_vision: bool = opt(False, "freeze the vision tower (vision-language models)")
    freeze_projector: bool = opt(False, "freeze the vision-to-language projector")
    freeze_language: bool = opt(False, "freeze the language model (its embeddings and LM head included)")
    attention: str = opt("auto", "packed attention backend", choices=BACKENDS)
    load_in_4bit: bool = opt(False, "QLoRA: the language model's linear layers in bitsandbytes NF4 (needs lora.r > 0, "
                                    "CUDA, bitsandbytes and deepspeed.zero_stage=0); final/ is exported dequantized")


@dataclass
class DataConfig:
    train: str = opt("", "training pairs: MMPR meta .json, .jsonl, .parquet or a saved datasets folder")
    eval: str = opt("", "held-out pairs (same formats); empty = no evaluation")
    eval_prompts: str = opt("", "held-out questions (`mpo eval`'s JSONL: question, answer, image) answered greedily "
                                "during training: eval/accuracy; empty = none")
    packing: str = opt("prefix", "packed row layout", choices=LAYOUTS)
    overlong: str = opt("truncate", "pairs longer than a row: cut the responses, or drop the pair", choices=OVERLONG)
    strict: bool = opt(False, "stop at the first bad record instead of skipping it")
    max_patches: int | None = opt(None, "InternVL: image tiles per pair (None: the dataset's or processor's)", low=1)
    min_pixels: int | None = opt(None, "Qwen-VL: fewest pixels an image is resized to (None: the processor's)", low=1)
    max_pixels: int | None = opt(None, "Qwen-VL: most pixels an image is resized to (None: the processor's)", low=1)
    shuffle_window: int = opt(4096, "pairs per first-fit-decreasing window when planning rows", low=1)
    num_workers: int = opt(2, "processes rendering the next rows while a step runs, and indexing the data "
                              "(0: in the training process)", low=0)
    prefetch_factor: int = opt(2, "rows each data worker renders ahead", low=1)
    index_dir: str = opt("", "folder of pair indexes (`mpo data index`); empty = the run folder")
    image_root: str = opt("", "where TRL-style records' relative image paths resolve; empty = the data file's folder")
    allow_outside_root: bool = opt(False, "let image paths resolve outside their root (MMPR: the dataset's root)")
    max_image_pixels: int = opt(50_000_000, "images with more pixels are rejected (checked from the header)", low=1)


@dataclass
class LossConfig:
    types: list[str] = opt(list(MPO_LOSS_TYPES), "loss types combined (sigmoid, bco_pair, sft, hinge, ipo, ...)")
    weights: list[float] = opt(list(MPO_LOSS_WEIGHTS), "one weight per loss type")
    beta: float = opt(0.1, "KL weight beta of the implicit reward", low=1e-12, high=100.0)
    sft_normalization: str = opt("sequence", "sft term: per response (the paper's Eq. 8) or per chosen token (TRL)",
                                 choices=("sequence", "token"))
    label_smoothing: float = opt(0.0, "label smoothing (cDPO / robust / exo_pair)", low=0.0, high=0.5)
    reward_shift: str = opt("cumulative", "bco_pair's reward shift delta", choices=RewardShift.MODES)
    reward_shift_momentum: float = opt(0.99, "momentum of the ema reward shift", low=0.0, high=0.999999)
    reference: str = opt("cache", "reference log-probs: cache (computed once, before training) or online",
                         choices=("cache", "online"))
    reference_model: str = opt("", "reference model folder; empty = the initial policy (model.path)")
    reference_cache: str = opt("", "reference cache file; empty = <output_dir>/reference_logps.safetensors")
    impl: str = opt("auto", "fused LM-head path: auto (Triton on CUDA), triton or torch",
                    choices=("auto", "triton", "torch"))
    router_aux_coef: float | None = opt(None, "weight of a mixture of experts' load-balancing loss; None = the "
                                              "model config's when it sets output_router_logits, else 0", low=0.0)


@dataclass
class OptimConfig:
    lr: float = opt(5e-6, "peak learning rate (AdamW); the language model's", low=0.0)
    vision_lr: float | None = opt(None, "peak learning rate of the vision tower (None: optim.lr)", low=0.0)
    projector_lr: float | None = opt(None, "peak learning rate of the vision-to-language projector (None: optim.lr)",
                                     low=0.0)
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases and norms)", low=0.0)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon", low=0.0)
    warmup_ratio: float = opt(0.03, "share of the steps spent warming the learning rate up linearly", low=0.0, high=1.0)
    schedule: str = opt("cosine", "learning-rate decay after warm-up", choices=("cosine", "constant", "linear"))
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", low=0.0)
    max_skipped_steps: int = opt(5, "stop after this many consecutive skipped (non-finite) steps", low=1)


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/mpo", "run directory (overridden by --output-dir)")
    max_steps: int = opt(0, "optimizer steps to run; 0 = train.epochs epochs", low=0)
    epochs: int = opt(1, "passes over the data when max_steps is 0", low=1)
    seed: int = opt(0, "seed of data order, packing and initialisation", low=0)
    global_batch_pairs: int = opt(256, "pairs per optimizer step, over all micro-batches and ranks", low=1)
    max_tokens_per_row: int = opt(8192, "tokens per packed row on one rank (one micro-batch)", low=2)
    sequence_parallel_size: int = opt(1, "ranks that split each packed row (DeepSpeed Ulysses; a row then holds "
                                         "max_tokens_per_row x N tokens); world = data x sequence parallel", low=1)
    eval_every: int = opt(0, "evaluate every N steps (0 = only before and after training)", low=0)
    eval_generation_every: int = opt(0, "answer data.eval_prompts every N steps (0 = only before and after "
                                        "training)", low=0)
    eval_max_new_tokens: int = opt(256, "longest answer generated for data.eval_prompts", low=1)
    eval_batch_size: int = opt(32, "questions per generate call for data.eval_prompts", low=1)
    device: str = opt("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))


@dataclass
class LoRAConfig:
    r: int = opt(0, "LoRA rank (peft); 0 = train the weights themselves", low=0)
    alpha: float = opt(16.0, "LoRA alpha: the update is scaled by alpha / r", low=0.0)
    dropout: float = opt(0.0, "dropout on the adapters' input", low=0.0, high=0.9)
    target_modules: list[str] = opt([], "modules to adapt (names or name suffixes); empty = every linear layer of the "
                                        "language model, the LM head excluded")
    modules_to_save: list[str] = opt([], "modules trained in full beside the adapters (e.g. multi_modal_projector)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = opt(3, "ZeRO stage: 0 (data parallel), 1, 2 or 3 (parameters partitioned)", low=0, high=3)
    offload_optimizer: bool = opt(False, "keep optimizer states in CPU memory (ZeRO stages 1-3)")
    config: str = opt("", "DeepSpeed JSON whose entries are merged over the generated config")


@dataclass
class CheckpointConfig:
    every_steps: int = opt(0, "save a resumable checkpoint every N steps (0 = only at the end)", low=0)
    keep_last: int = opt(2, "checkpoints kept (older ones are deleted)", low=1)
    export_final: bool = opt(True, "write <output_dir>/final as a from_pretrained folder at the end")
    export_shard_gb: float = opt(5.0, "largest weight file of final/ in GB; rank 0 holds about one while exporting",
                                 low=0.001)


@dataclass
class LoggingConfig:
    every_steps: int = opt(1, "log training metrics every N steps", low=1)
    report_to: list[str] = opt(["tensorboard"], "also report to: tensorboard (when installed), wandb (Weights & "
                                                 "Biases, must be installed)", choices=REPORTERS)
    wandb_project: str = opt("", "Weights & Biases project; empty = mpo")
    progress: bool = opt(True, "show a progress bar with ETA")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "optim": OptimConfig,
            "lora": LoRAConfig, "train": TrainConfig, "deepspeed": DeepSpeedConfig, "checkpoint": CheckpointConfig,
            "logging": LoggingConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value, hint):
    """Check `value` against the field's type hint (ints are accepted for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
    if hint is str and value is None:
        return ""
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _check_field(key: str, f: dataclasses.Field, value) -> None:
    meta = f.metadata
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{key}: {v!r} is not a finite number")
        if meta.get("choices") and v not in meta["choices"]:
            raise ValueError(f"{key}: {v!r} is not one of {list(meta['choices'])}")
        if v is not None and not isinstance(v, str) and meta.get("low") is not None and v < meta["low"]:
            raise ValueError(f"{key}: {v!r} is below the minimum {meta['low']}")
        if v is not None and not isinstance(v, str) and meta.get("high") is not None and v > meta["high"]:
            raise ValueError(f"{key}: {v!r} is above the maximum {meta['high']}")


def _set(cfg: Config, section: str, key: str, value, where: str) -> None:
    if section not in SECTIONS:
        raise ValueError(f"{where}unknown config section {section!r} (sections: {', '.join(SECTIONS)})")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ValueError(f"{where}unknown config key '{section}.{key}' (keys: {', '.join(fields)})")
    hints = typing.get_type_hints(type(obj))
    name = f"{where}{section}.{key}"
    value = _coerce(name, value, hints[key])
    _check_field(name, fields[key], value)
    setattr(obj, key, value)


@dataclass(frozen=True)
class Renamed:
    """A key an older version wrote, read as the key that replaced it."""

    new: str  # the dotted key that replaced the old one
    old_type: type  # what the old key held
    convert: typing.Callable  # old value -> new value


RENAMED = {
    # the old key's default (true) reads as the new key's default ([tensorboard])
    "logging.tensorboard": Renamed("logging.report_to", bool, lambda on: ["tensorboard"] if on else []),
}


def _current(name: str, value, where: str, *, notice: bool = True) -> tuple[str, object]:
    """(dotted key, value) of `name: value` in the keys of this version."""
    renamed = RENAMED.get(name)
    if renamed is None:
        return name, value
    new = renamed.convert(_coerce(f"{where}{name}", value, renamed.old_type))
    if notice:
        print(f"mpo: {where}config key {name} is now {renamed.new}; read {name}: {_flow(value)} as "
              f"{renamed.new}: {_flow(new)}", file=sys.stderr)
    return renamed.new, new


def _flow(value) -> str:
    """A value as it would be written in YAML on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize).removesuffix("\n...\n").strip()


def saved_in_current_keys(saved: dict) -> dict:
    """A config dict an older (or this) version wrote (trainer.json) in this version's keys: renamed
    keys in their new form, keys added since at their defaults (a key is added with the default that
    keeps what versions without it did)."""
    current = Config().to_dict()
    for section, entries in saved.items():
        for key, value in entries.items():
            name, value = _current(f"{section}.{key}", value, "saved config: ", notice=False)
            new_section, _, new_key = name.partition(".")
            current.setdefault(new_section, {})[new_key] = value
    return current


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config maps section names to their keys")
        given = {}
        for section, entries in data.items():
            if not isinstance(entries, dict):
                if section not in SECTIONS:
                    raise ValueError(f"{path}: unknown config section {section!r}")
                raise ValueError(f"{path}: section {section!r} must map keys to values")
            for key, value in entries.items():
                name, value = _current(f"{section}.{key}", value, f"{path}: ")
                if name in given:
                    raise ValueError(f"{path}: {given[name][0]} and {section}.{key} name one key; keep {name}")
                given[name] = (f"{section}.{key}", value)
        for name, (_, value) in given.items():
            section, _, key = name.partition(".")
            _set(cfg, section, key, value, f"{path}: ")
    for item in overrides:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: {e}") from e
        name, value = _current(f"{section}.{key}", value, "override: ")
        section, _, key = name.partition(".")
        _set(cfg, section, key, value, "override: ")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks across fields (single fields were checked as they were set)."""
    try:
        check_loss_spec(cfg.loss.types, cfg.loss.weights)
    except ValueError as e:
        raise ValueError(f"loss.types / loss.weights: {e}") from None
    # a negative weight maximises its loss; all zero trains nothing while the run looks fine
    if any(w < 0 for w in cfg.loss.weights) or not any(cfg.loss.weights):
        raise ValueError(f"loss.weights: each weight must be >= 0 and one > 0, got {cfg.loss.weights}")
    if cfg.lora.r and cfg.lora.alpha <= 0:
        raise ValueError(f"lora.alpha: the adapters' update is scaled by alpha / r, so alpha {cfg.lora.alpha} "
                         "would train and export the base model unchanged; set lora.alpha > 0")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ValueError(f"optim.betas: two values in [0, 1) expected, got {cfg.optim.betas}")
    if cfg.model.load_in_4bit:
        if not cfg.lora.r:
            raise ValueError("model.load_in_4bit (QLoRA) trains LoRA adapters over frozen 4-bit weights: "
                             "set lora.r > 0")
        if cfg.deepspeed.zero_stage != 0:
            raise ValueError("model.load_in_4bit needs deepspeed.zero_stage=0: ZeRO-3 cannot partition bitsandbytes' "
                             "packed 4-bit weights (each rank holds the whole 4-bit model; only the adapters train)")
        if cfg.train.device == "cpu":
            raise ValueError("model.load_in_4bit needs a CUDA device (bitsandbytes' 4-bit kernels); "
                             "train.device is cpu")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    for key, value in (("model.path", cfg.model.path), ("data.train", cfg.data.train)):
        if not value:
            raise ValueError(f"{key} is required")


def dump(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def help_text() -> str:
    """Every section.key with its default and help, for `mpo train --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            choices = f" {{{', '.join(map(str, f.metadata['choices']))}}}" if f.metadata.get("choices") else ""
            lines.append(f"  {section}.{f.name} = {default!r}{choices}\n      {f.metadata['help']}")
    return "\n".join(lines)
