"""Sequence parallelism (DeepSpeed's Ulysses): one packed row split into contiguous shards over the
ranks of a group.

Every rank of a sequence-parallel group holds the same packed row, padded to a multiple of the
group size with a document of its own (nothing is scored on it, nothing attends to it), and runs
the model on its shard: rank r on the r-th contiguous 1/N of the tokens. Embeddings, MLPs and the
LM head's log-probs stay on the shard. The row's images are shared out: each rank encodes about
1/N of them and the group's features are gathered (an all-gather forward, the gradients summed
backward), so each image is encoded once per group, not once per rank (bench/bench_sp_images.py).
In each attention layer DeepSpeed's `UlyssesSPAttentionHF` trades tokens for heads (an
all-to-all): each rank attends over the whole row for 1/N of the heads, through
`mpo.models.packed_attention` with the whole row's documents and branches, then trades back. The
per-sequence log-prob sums and token counts are added over the group (`mpo.distributed.group_sum`)
before the loss, so a pair whose response straddles two shards gets exactly its unsplit sums.

Gradients: every rank of the group computes the same loss from the summed sums; `group_sum`'s
backward hands each rank the gradient of its own part only, so the group's backward covers each
token once. ZeRO-3 averages gradients over all ranks (data x sequence parallel), and the trainer's
loss scale (the world size) turns that average back into the sum over the step's rows.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from mpo.data.packing import PackedBatch, with_document
from mpo.distributed import gather_rows


@dataclass(frozen=True)
class Shard:
    """This rank's part of each packed row: the `rank`-th of `world` contiguous pieces; `group`:
    the ranks that share the row."""

    rank: int
    world: int
    group: object

    def padded(self, batch: PackedBatch, position_rows: int = 1) -> PackedBatch:
        """The row with a padding document making its length a multiple of `world` (none if it is)."""
        pad = -batch.num_tokens % self.world
        if not pad:
            return batch
        return with_document(batch, [0] * pad, torch.arange(pad).expand(position_rows, pad))

    def local(self, batch: PackedBatch) -> slice:
        """This rank's token positions in a `padded` row."""
        size = batch.num_tokens // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    @contextlib.contextmanager
    def vision_language_on_part(self, family, model: torch.nn.Module, part: slice):
        """A vision-language `model` on this rank's `part` of the row: the group encodes the row's
        images, each image once (`images_shared`), and the language model runs on the part."""
        with self.images_shared(family, model), \
                self.language_model_on_part(family.parts(model)["language"][0], part):
            yield

    @contextlib.contextmanager
    def language_model_on_part(self, language_model: torch.nn.Module, part: slice):
        """While it lasts, `language_model` runs on the `part` of its inputs: a vision-language
        model's backbone embeds the whole row (the row's image features in), then hands the language
        model this rank's part."""
        def on_part(module, args, kwargs):
            if kwargs.get("inputs_embeds") is None:
                raise RuntimeError(f"{type(module).__name__} was called without inputs_embeds: sequence "
                                   "parallelism cannot find the row's embeddings to split")
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, part]
            positions = kwargs.get("position_ids")
            if positions is not None:
                positions = positions[..., part]
                if positions.ndim == 3 and positions.shape[0] == 3:
                    # M-RoPE: a text row in front (Qwen-VL then hands the attention position ids,
                    # which Ulysses gathers; the packed attention itself reads none)
                    positions = torch.cat([positions[:1], positions])
                kwargs["position_ids"] = positions
            if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL's deepstack features, per image token
                where = kwargs["visual_pos_masks"][0].nonzero()[:, 0]
                kept = (where >= part.start) & (where < part.stop)
                kwargs["visual_pos_masks"] = kwargs["visual_pos_masks"][:, part]
                kwargs["deepstack_visual_embeds"] = [e[kept] for e in kwargs["deepstack_visual_embeds"]]
            return args, kwargs

        handle = language_model.register_forward_pre_hook(on_part, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def images_shared(self, family, model: torch.nn.Module):
        """While it lasts, `model`'s image encoder runs on this rank's share of the row's images (a
        contiguous run, about 1/N of the row's patches) and hands back the whole group's features
        (`gather_rows`): the group encodes each image once, each rank holding the activations of its
        own share for the backward. A rank left without an image (fewer images than ranks) encodes
        the row's last one and keeps none of it: every rank runs the encoder forward and backward,
        as ZeRO-3's parameter gathering needs."""
        kept = []  # whether this rank encodes images of its own, for the hook after the encoder

        def before(module, args, kwargs):
            rows, take = family.encoder_images(args, kwargs)
            bounds = _balanced(rows, self.world)
            first, stop = bounds[self.rank], bounds[self.rank + 1]
            kept[:] = [stop > first]
            return take(first, stop) if stop > first else take(len(rows) - 1, len(rows))

        def gathered(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else gather_rows(x, len(x) if kept[0] else 0, self.group)

        def after(module, args, kwargs, output):
            if not isinstance(output, ModelOutput):
                raise TypeError(f"{type(module).__name__} returned a {type(output).__name__}, not a ModelOutput: "
                                "sequence parallelism cannot gather its features by name")
            for field in list(output.keys()):
                value = output[field]
                if field not in family.encoder_outputs:
                    output[field] = None  # this rank's share only: nothing may read it as the row's
                elif isinstance(value, torch.Tensor):
                    output[field] = gathered(value)
                else:  # per layer (hidden states, deepstack features)
                    output[field] = type(value)(gathered(v) for v in value)
            return output

        encoder = family.image_encoder(model)
        handles = [encoder.register_forward_pre_hook(before, with_kwargs=True),
                   encoder.register_forward_hook(after, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _balanced(costs: list[int], parts: int) -> list[int]:
    """Bounds b[0] = 0 <= ... <= b[parts] = len(costs) cutting `costs` into `parts` contiguous runs of
    about equal sums (run k: items b[k] .. b[k+1]-1)."""
    total, cumulative = sum(costs), [0, *itertools.accumulate(costs)]
    cuts = [bisect.bisect_left(cumulative, k * total / parts) for k in range(1, parts)]
    return [0, *(min(c, len(costs)) for c in cuts), len(costs)]


def enable(model_path: str, size: int, dist_) -> Shard:
    """Route every attention through Ulysses for groups of `size` consecutive ranks (DeepSpeed's
    layout: ranks k * size ... (k + 1) * size - 1 share rows) -> this rank's shard. Refused, with
    the reason, where the heads do not split over the group."""
    from transformers import AutoConfig

    from mpo.models.packed_attention import register

    if dist_.world % size:
        raise ValueError(f"train.sequence_parallel_size {size} does not divide the {dist_.world} ranks")
    text = AutoConfig.from_pretrained(model_path).get_text_config()
    heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if heads % size or (kv % size and size % kv):
        raise ValueError(f"train.sequence_parallel_size {size}: {model_path} has {heads} attention heads and {kv} "
                         "key/value heads; each rank takes 1/N of the heads, so N must divide the heads, and "
                         "divide the key/value heads or be a multiple of them")
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model_path, core_attn_implementation=register(), sequence_parallel_size=size,
        micro_batch_size=1, seq_length_is_variable=True)
    return Shard(dist_.rank % size, size, mpu.get_sequence_parallel_group())


def mpu():
    """DeepSpeed's sequence-parallel state (its `mpu`), for deepspeed.initialize once `enable` ran."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as state

    return state
