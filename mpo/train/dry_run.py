"""`mpo train CONFIG --dry-run`: a run's plan and a per-rank GPU memory forecast, without reading a
weight, starting a process group or training.

The plan is the trainer's own: the pair index (`PairDataset.open`, which needs only the tokenizer,
processor and data files; loaded from or saved to data.index_dir when that is set, else built in
memory) and `TrainPlan.rows(step, ranks)` for every step, so pairs, steps, rows and the longest
row are the numbers the run will have. The model is built on the meta device from config.json,
then frozen and given its LoRA adapters by the trainer's own functions (`engine.freeze`,
`lora.add_lora`: peft builds the adapters on the meta model too), so parameter counts are exact.

Memory per rank, in bytes, for a GPU run with 16-bit weights (model.dtype auto is bf16 on a GPU;
an fp32 config is forecast as bf16 and the report says so):
- model states (`model_states_bytes`): weights, gradients and AdamW states, from DeepSpeed's own
  estimators at the configured ZeRO stage and offload; an online reference model adds its weights;
- activations of the longest row (`activation_bytes`), from the language model's config;
- the fused LM head's buffers for that row (`loss_buffer_bytes`), on the Triton path.
Not counted: the vision tower's activations (none when it is frozen; a trained tower keeps its own,
per vision token, layer and image tile, fewer with gradient checkpointing; under sequence parallelism
those of the rank's share of the row's images), DeepSpeed's
communication buckets beyond the largest layer, the CUDA context and allocator fragmentation:
leave a few GB under --gpu-memory.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mpo.train.config import Config

GIB = 1 << 30
WEIGHT_BYTES = 2  # bf16 / fp16 weights, gradients and activations
# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per block of 64 and
# an fp32 absmax per 256 of those blocks
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- the plan -------------------------------------------------------------------------------------------------

def plan(cfg: Config, ranks: int) -> dict:
    """The training pairs and every step's rows as the trainer makes them (`Trainer.__init__`,
    `_pairs`, `train_step`) on `ranks` ranks."""
    from mpo.data.dataset import PairDataset
    from mpo.data.formats import DataSource
    from mpo.data.packing import PackingOptions
    from mpo.data.records import Rejects
    from mpo.data.render import ImageOptions
    from mpo.train.data import TrainPlan

    sp = cfg.train.sequence_parallel_size  # ranks sharing each row: rows go to ranks // sp data ranks
    packing = PackingOptions(cfg.data.packing, cfg.train.max_tokens_per_row * sp, cfg.data.overlong)
    images = ImageOptions(cfg.data.max_patches, cfg.data.min_pixels, cfg.data.max_pixels, cfg.data.max_image_pixels)
    source = DataSource(cfg.data.train, image_root=cfg.data.image_root or None,
                        allow_outside_root=cfg.data.allow_outside_root)
    pairs = PairDataset.open(cfg.model.path, source, packing, Rejects(None, strict=cfg.data.strict), images=images,
                             index_dir=cfg.data.index_dir or None, workers=cfg.data.num_workers)
    schedule = TrainPlan(pairs, seed=cfg.train.seed, global_batch_pairs=cfg.train.global_batch_pairs,
                         window=cfg.data.shuffle_window)
    steps = cfg.train.max_steps or cfg.train.epochs * schedule.steps_per_epoch
    rows, blank, rounds, tokens, step_max, longest, longest_cost = 0, 0, 0, 0, 0, (), 0
    for step in range(steps):
        chosen, dealt = schedule.rows(step, ranks // sp)
        counts = [len(mine) for mine in dealt]
        rows, rounds = rows + sum(counts), max(rounds, *counts)
        blank += ranks // sp * max(counts) - sum(counts)  # every rank runs as many micro-batches as the busiest
        step_tokens = int(pairs.costs[chosen].sum())
        tokens, step_max = tokens + step_tokens, max(step_max, step_tokens)
        for row in (row for mine in dealt for row in mine):
            cost = int(pairs.costs[list(row)].sum())
            if cost > longest_cost:
                longest, longest_cost = row, cost
    a, members = pairs.index.arrays, list(longest)
    return {"pairs": len(pairs.valid), "rejected": dict(pairs.rejected), "pairs_per_step": schedule.batch,
            "steps": steps, "rows": rows, "blank_rows": blank, "micro_batches_per_rank": rounds,
            "tokens_per_step": round(tokens / steps), "tokens_per_step_max": step_max,
            "longest_row_tokens": longest_cost,
            # the tokens whose targets are scored: every chosen and rejected response token
            "longest_row_scored_tokens": int(a["chosen"][members].sum() + a["rejected"][members].sum()),
            "longest_row_tiles": int(a["tiles"][members].sum())}


# --- the model, on the meta device ----------------------------------------------------------------------------

@dataclass
class Skeleton:
    config: object  # the model's transformers config
    parameters: int
    trainable: int
    largest_layer: int  # the most parameters one module holds itself (ZeRO-3 gathers a module at a time)
    nf4: int  # weights stored as NF4 (model.load_in_4bit)
    head_bias: bool
    lora_bytes_per_token: int  # what the language model's adapters keep for backward, per token, all layers


def skeleton(path: str, cfg: Config, *, policy: bool = True) -> Skeleton:
    """A model folder's model built on the meta device (config.json only: no weight is read); the
    policy frozen and given its LoRA adapters as the trainer's `engine.build` does."""
    from transformers import AutoConfig

    from mpo.families import family_of
    from mpo.models.lora import add_lora
    from mpo.train.engine import freeze

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {path}")
    config = AutoConfig.from_pretrained(path)
    family = family_of(config)
    with torch.device("meta"):
        model = family.auto_class().from_config(config)
        nf4 = _nf4_weights(model, family) if cfg.model.load_in_4bit else set()
        lora = policy and cfg.lora.r > 0
        if policy:
            freeze(model, cfg)
        if lora:
            c = cfg.lora
            add_lora(model, c.r, c.alpha, c.dropout, c.target_modules, c.modules_to_save)
    params = list(model.parameters())  # a tied weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return Skeleton(config, sum(p.numel() for p in params),
                    sum(p.numel() for p in params if p.requires_grad) if policy else 0, largest,
                    sum(p.numel() for p in params if id(p) in nf4), model.get_output_embeddings().bias is not None,
                    _lora_bytes_per_token(model, family, cfg.lora.dropout) if lora else 0)


def _nf4_weights(model, family) -> set[int]:
    """ids of the weights `mpo.models.quantized` stores as NF4: the language model's linear layers,
    the LM head excepted."""
    head = model.get_output_embeddings()
    return {id(m.weight) for part in family.parts(model)["language"] for m in part.modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def _lora_bytes_per_token(model, family, dropout: float) -> int:
    """Per token, over the language model's adapted layers: A's output (r values) for B's
    gradient, and with dropout the dropped-out copy of the layer's input and its mask (1 byte)."""
    from peft.tuners.lora import LoraLayer

    inside = {id(m) for part in family.parts(model)["language"] for m in part.modules()}
    total = 0
    for m in model.modules():
        if isinstance(m, LoraLayer) and id(m) in inside:
            total += WEIGHT_BYTES * sum(m.r.values())
            if dropout > 0:
                total += (WEIGHT_BYTES + 1) * m.in_features
    return total


# --- memory ---------------------------------------------------------------------------------------------------

def _estimators():
    # DeepSpeed's logger writes to stdout, which --json keeps for the JSON object alone
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero3_model_states_mem_needs, estimate_zero2_model_states_mem_needs


def weight_bytes(count: int, *, ranks: int, stage: int, offloaded: bool = False, nf4: int = 0) -> int:
    """GPU bytes per rank of `count` weights that do not train: 16-bit (`nf4` of them NF4), a shard
    on each rank at stage 3 (none when parameters are offloaded), all of them on every rank below."""
    if stage == 3:
        return 0 if offloaded else WEIGHT_BYTES * count // ranks
    return WEIGHT_BYTES * (count - nf4) + round(NF4_BYTES * nf4)


def model_states_bytes(trainable: int, frozen: int, largest_layer: int, *, ranks: int, stage: int,
                       offload_optimizer: bool = False, offload_params: bool = False, frozen_nf4: int = 0) -> int:
    """GPU bytes per rank of weights, gradients and AdamW states (16-bit weights; fp32 master weights,
    gradients and states, as DeepSpeed keeps them).

    DeepSpeed's estimators assume every parameter trains. They are given the trainable count; a
    frozen parameter never reaches the optimizer (its param groups hold trainable ones only), so it
    has no gradient, master weight or Adam state and adds only its weight (`weight_bytes`). The
    stage-3 estimate's 4 bytes per parameter of the largest layer (a gathered 16-bit weight and its
    gradient) stay whatever trains: a frozen layer is gathered all the same.
    - stage 3: `estimate_zero3_model_states_mem_needs`. It has no case for parameters offloaded
      without the optimizer: that is its no-offload figure less the 16-bit weight shards.
    - stages 1 and 2: `estimate_zero2_model_states_mem_needs` (16-bit weights on every rank; 16-bit
      and fp32 gradients, fp32 weights and Adam states sharded). Stage 1 keeps the whole 16-bit
      gradient on every rank until the step: the difference is added.
    - stage 0: DeepSpeed's 16-bit optimizer wrapper keeps what ZeRO-2 keeps, unsharded: the stage-2
      estimate for one GPU.
    """
    estimate_zero3, estimate_zero2 = _estimators()
    frozen_bytes = weight_bytes(frozen, ranks=ranks, stage=stage, offloaded=offload_params, nf4=frozen_nf4)
    if stage == 3:
        gpu = estimate_zero3(trainable, largest_layer, num_gpus_per_node=ranks, cpu_offload=offload_optimizer,
                             cpu_offload_params=offload_params, zero_init=True)[1]
        if offload_params and not offload_optimizer:
            gpu -= WEIGHT_BYTES * trainable // ranks
        return gpu + frozen_bytes
    gpu = estimate_zero2(trainable, num_gpus_per_node=ranks if stage else 1,
                         cpu_offload=offload_optimizer and stage > 0)[1]
    if stage == 1:
        gpu += WEIGHT_BYTES * trainable - WEIGHT_BYTES * trainable // ranks
    return gpu + frozen_bytes


def activation_bytes(text_config, tokens: int, *, checkpointing: bool, lora_bytes_per_token: int = 0) -> int:
    """Bytes the language model keeps for backward on a row of `tokens` tokens.

    Per token and decoder layer (pre-norm attention + gated MLP, as Llama / Qwen / InternVL's LMs),
    with h hidden, i intermediate, a heads and k key-value heads of d dims, 16-bit activations:
        2 RMSNorms:  2 * (8h + 4)        each keeps its input upcast to fp32 (4h), that cast back to
                                         16 bits for the weight's gradient (2h), its output (2h: the
                                         projections' saved input) and the fp32 1/rms (4)
        attention:   2 * (2ad + 2kd) + 4a  q and k after RoPE, v, the output (o_proj's input) and
                                         the fp32 log-sum-exp per head: flash-attn varlen or
                                         FlexAttention, no [T x T] term (model.attention=sdpa adds one)
        MLP:         2 * 4i              gate (SiLU's input), SiLU(gate), up, their product (down's input)
    plus the adapters' own (LoRA); once per token, the final norm (8h + 4, its output being the
    hidden state the fused loss keeps), RoPE's cos and sin (4d) and the int64 token id (8). That is
    what autograd holds after a forward of transformers' Qwen2 in bf16 (SDPA on a CPU keeps the same
    tensors as flash-attn). With gradient checkpointing each layer keeps only its 16-bit input (2h),
    and one layer's activations exist again while it is recomputed in backward. An upper bound where
    the decoder's weights are frozen (LoRA): autograd may then keep less for the projections.
    """
    h, i, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    a = text_config.num_attention_heads
    k = getattr(text_config, "num_key_value_heads", None) or a
    d = getattr(text_config, "head_dim", None) or h // a
    per_layer = 2 * (8 * h + 4) + WEIGHT_BYTES * (2 * a * d + 2 * k * d) + 4 * a + WEIGHT_BYTES * 4 * i
    per_layer += lora_bytes_per_token // layers
    once = 8 * h + 4 + 4 * d + 8
    if checkpointing:
        return tokens * (layers * WEIGHT_BYTES * h + per_layer + once)
    return tokens * (layers * per_layer + once)


def loss_buffer_bytes(tokens: int, scored: int, hidden: int, vocab: int, *, bias: bool = False) -> int:
    """Peak bytes of the fused LM head's own buffers for one row on the Triton path
    (`mpo.kernels.lm_head`), with the tiles of an H100 (`family_config(90, bf16)`); N = `tokens`
    row tokens, M = `scored` of them with a target, D = `hidden`, V = `vocab`. Never [N x V].

    Kept from forward to backward: lse [M] fp32 and the int64 row, target and sequence ids [M]
    (`linear_sequence_logps`). Forward: `lse_partials`' two [splits, M] fp32 partials and the [M]
    fp32 target logits. Backward: the [M, chunk] dlogits scratch (`dlogits_columns`), the fp32
    [M, D] dH accumulator when V spans more than one chunk, dH [N, D] itself, and with a bias its
    [row blocks, chunk] column sums and fp32 [V] gradient. The LM-head weight's gradient [V, D] is
    a model state (the largest layer's gradient, at stage 3).
    """
    from mpo.kernels.config import family_config

    cfg = family_config(90, torch.bfloat16)
    M, N, D, V = scored, tokens, hidden, vocab
    kept = 4 * M + 3 * 8 * M
    # the vocabulary splits `lse_partials` picks: enough to fill the GPU, whole tiles each
    row_blocks, tiles = _cdiv(M, cfg.block_m), _cdiv(V, cfg.block_v)
    splits = max(1, min(tiles, cfg.target_programs // max(row_blocks, 1)))
    splits = _cdiv(tiles, _cdiv(tiles, splits))
    forward = 2 * 4 * splits * M + 4 * M
    chunk = dlogits_columns(M, V, cfg)
    backward = WEIGHT_BYTES * M * chunk + (4 * M * D if _cdiv(V, chunk) > 1 else 0) + WEIGHT_BYTES * N * D
    if bias:
        backward += 4 * row_blocks * chunk + 4 * V
    return kept + max(forward, backward)


def dlogits_columns(scored: int, vocab: int, cfg) -> int:
    """The backward's vocabulary chunk, as `mpo.kernels.logits_grad.scratch_columns` picks it for
    16-bit inputs (here without importing Triton): what fits cfg.scratch_bytes in whole tiles, at
    least cfg.min_chunk_cols, at most the vocabulary."""
    per_tile = max(scored, 1) * cfg.block_v * WEIGHT_BYTES
    tiles = max(1, cfg.scratch_bytes // per_tile, _cdiv(cfg.min_chunk_cols, cfg.block_v))
    return min(tiles, _cdiv(vocab, cfg.block_v)) * cfg.block_v


def _offload(ds_config: dict, what: str) -> bool:
    entry = ds_config.get("zero_optimization", {}).get(what) or {}
    return entry.get("device", "none") in ("cpu", "nvme")


# --- the report -----------------------------------------------------------------------------------------------

def dry_run(cfg: Config, *, ranks: int = 1, gpu_memory_gb: float = 80.0) -> dict:
    """The plan, the parameter counts and the per-rank memory forecast of `cfg` on `ranks` ranks
    with `gpu_memory_gb` GiB each."""
    from mpo.families import family_of
    from mpo.models.loading import DTYPES
    from mpo.train.engine import deepspeed_config
    from mpo.train.reference import base_is_reference

    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"--ranks: a whole number >= 1 expected, got {ranks!r}")
    if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)) \
            or not 0 < gpu_memory_gb < float("inf"):
        raise ValueError(f"--gpu-memory: GiB per GPU, a number > 0 expected, got {gpu_memory_gb!r}")
    sp = cfg.train.sequence_parallel_size
    if ranks % sp:
        raise ValueError(f"--ranks {ranks}: train.sequence_parallel_size {sp} must divide the ranks")
    notes = []
    dtype = "bf16" if cfg.model.dtype in ("auto", "fp32") else cfg.model.dtype
    if cfg.model.dtype == "fp32":
        notes.append("model.dtype is fp32: memory is forecast for bf16, the 16-bit weights DeepSpeed's estimators "
                     "count")
    ds_config = deepspeed_config(cfg, DTYPES[dtype])
    stage = cfg.deepspeed.zero_stage
    offload_optimizer, offload_params = _offload(ds_config, "offload_optimizer"), _offload(ds_config, "offload_param")

    steps = plan(cfg, ranks)
    model = skeleton(cfg.model.path, cfg)
    states = model_states_bytes(model.trainable, model.parameters - model.trainable, model.largest_layer,
                                ranks=ranks, stage=stage, offload_optimizer=offload_optimizer,
                                offload_params=offload_params, frozen_nf4=model.nf4)
    reference = 0
    if cfg.loss.reference == "online" and set(cfg.loss.types) != {"sft"} and not base_is_reference(cfg):
        path = cfg.loss.reference_model or cfg.model.path
        ref = skeleton(path, cfg, policy=False)
        reference = weight_bytes(ref.parameters, ranks=ranks, stage=stage, offloaded=offload_params, nf4=ref.nf4)

    family = family_of(model.config)
    tokens = steps["longest_row_tokens"]
    if family.vision and not steps["longest_row_tiles"]:
        tokens += len(family.blank_image()[0])  # a row without an image runs the blank one as an extra document
    text = model.config.get_text_config()
    # sequence parallelism: a rank keeps the activations of its 1/sp of the row (and scores its part)
    mine, scored = -(-tokens // sp), -(-steps["longest_row_scored_tokens"] // sp)
    activations = {ckpt: activation_bytes(text, mine, checkpointing=ckpt,
                                          lora_bytes_per_token=model.lora_bytes_per_token) for ckpt in (True, False)}
    loss = loss_buffer_bytes(mine, scored, text.hidden_size, text.vocab_size, bias=model.head_bias)
    if cfg.loss.impl == "torch":
        notes.append("loss.impl is torch: the fused loss is forecast on the Triton path (the PyTorch path also "
                     "keeps an fp32 [V, D] LM-head gradient)")
    if cfg.model.attention == "sdpa":
        notes.append("model.attention is sdpa: its [T x T] mask and attention buffers are not counted")
    ckpt = cfg.model.gradient_checkpointing
    total = states + reference + activations[ckpt] + loss
    return {
        "model": str(cfg.model.path), "family": family.name, "dtype": dtype, **steps,
        "longest_row_forward_tokens": tokens,
        "parameters": model.parameters, "trainable_parameters": model.trainable, "lora_r": cfg.lora.r,
        "ranks": ranks, "sequence_parallel_size": sp, "zero_stage": stage, "offload_optimizer": offload_optimizer,
        "offload_params": offload_params,
        "gradient_checkpointing": ckpt,
        "model_states_bytes_per_rank": states, "reference_bytes_per_rank": reference,
        "activation_bytes_longest_row": activations[ckpt],
        "activation_bytes_checkpointing": activations[True], "activation_bytes_no_checkpointing": activations[False],
        "loss_buffer_bytes": loss, "total_bytes_per_rank": total, "gpu_memory_gib": gpu_memory_gb,
        "fits": total <= gpu_memory_gb * GIB, "notes": notes,
    }


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def table(r: dict) -> str:
    """The report as a short table (memory in GiB)."""
    def line(label: str, n: int, extra: str = "") -> str:
        return f"  {label:<44}{n / GIB:8.2f}{extra}"

    offload = [w for w, on in (("optimizer", r["offload_optimizer"]), ("parameters", r["offload_params"])) if on]
    ckpt = r["gradient_checkpointing"]
    other = r["activation_bytes_no_checkpointing" if ckpt else "activation_bytes_checkpointing"]
    rejected = sum(r["rejected"].values())
    lines = [
        f"mpo train --dry-run: {r['model']} ({r['family']}, {r['dtype']}, ZeRO-{r['zero_stage']}"
        + (f", {' and '.join(offload)} offloaded" if offload else "") + f", {r['ranks']} rank{'s' * (r['ranks'] > 1)})",
        f"plan        {r['pairs']:,} pairs" + (f" ({rejected:,} rejected)" if rejected else "")
        + f", {r['steps']:,} steps of {r['pairs_per_step']:,}: {r['rows']:,} rows and {r['blank_rows']:,} blank ones, "
          f"at most {r['micro_batches_per_rank']} a rank a step",
        f"tokens      {r['tokens_per_step']:,} a step (at most {r['tokens_per_step_max']:,}); the longest row "
        f"{r['longest_row_tokens']:,} ({r['longest_row_forward_tokens']:,} in the forward, "
        f"{r['longest_row_scored_tokens']:,} scored)",
        f"parameters  {_count(r['parameters'])}, {_count(r['trainable_parameters'])} trainable"
        + (f" (LoRA r={r['lora_r']})" if r["lora_r"] else ""),
        f"memory per rank {'GiB':>39}",
        line("model states (weights, gradients, AdamW)", r["model_states_bytes_per_rank"]),
    ]
    if r["reference_bytes_per_rank"]:
        lines.append(line("online reference model", r["reference_bytes_per_rank"]))
    lines += [
        line(f"activations, longest row ({'checkpointed' if ckpt else 'not checkpointed'})",
             r["activation_bytes_longest_row"], f"   ({other / GIB:.2f} {'without' if ckpt else 'with'} "
                                                "gradient checkpointing)"),
        line("fused loss buffers, longest row", r["loss_buffer_bytes"]),
        line("total", r["total_bytes_per_rank"],
             f"   {'fits' if r['fits'] else 'does NOT fit'} in {r['gpu_memory_gib']:g} GiB"),
    ]
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])
