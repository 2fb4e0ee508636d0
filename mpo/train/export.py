"""The final export: run_dir/final as a from_pretrained folder, written shard by shard as the
parameters are gathered, so rank 0's host memory stays near one shard however large the model.

The folder is what transformers' `save_pretrained` writes for the same model (at the same
`max_shard_bytes`): the same tensors under the same names in the same files (where a tensor is
split on saving, MoE experts, the shard boundaries may differ), the same
`model.safetensors.index.json` (or one `model.safetensors` when everything fits one shard), and
config.json / generation_config.json; with the tokenizer and processor files of the original
model folder. What save_pretrained does to the state dict is done here by the same transformers
functions, on meta tensors first: tied weights are dropped (`remove_tied_weights_from_state_dict`)
and the names and layouts of the model's checkpoint format are restored
(`revert_weight_conversion`: InternVL's `language_model.model.*`, Qwen-VL's `visual.*`, MoE experts
one per tensor). That plan, made from the parameters' shapes alone (ZeRO-3's `ds_shape`), fixes
every file name, the index and the order of the gathers before anything is gathered; the
parameters are then gathered one at a time (a LoRA layer's weight together with its two
adapters, merged as they arrive), copied to rank 0's host, converted, and each shard is written
as soon as its last tensor arrives. Host memory: about one shard plus one parameter (the trainer's
shard size is `checkpoint.export_shard_gb`, 5 GB by default; this module's default is
save_pretrained's, 50 GB).

A LoRA run's adapters are merged into final/ and also saved alone in peft's layout under
final/adapter/. A QLoRA run's 4-bit base is dequantized first: final/ is the merged model in the
training dtype.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mpo.atomic import save_atomic, write_text_atomic
from mpo.distributed import Dist, Phase
from mpo.models.loading import lm_head
from mpo.models.lora import merge, merged_sources, save_adapter
from mpo.models.quantized import is_4bit

MODEL_FILES = re.compile(r"(model.*\.safetensors|pytorch_model.*\.bin|.*\.safetensors\.index\.json|config\.json|"
                         r"generation_config\.json)$")
MAX_SHARD_BYTES = 50 * 10**9  # save_pretrained's default max_shard_size ("50GB")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Plan:
    files: dict[str, list[str]]  # shard file -> the saved tensor names it holds
    sources: dict[str, tuple[str, ...]]  # exported name -> the model's parameters and buffers it is made from
    groups: list[list[str]]  # exported names gathered and converted together, in writing order
    index: dict | None  # model.safetensors.index.json; None for a single file


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    """A stand-in of the full tensor's shape and dtype (a ZeRO-3 parameter holds only its partition)."""
    return torch.empty(getattr(tensor, "ds_shape", tensor.shape), dtype=tensor.dtype, device="meta")


def plan_export(model, max_shard_bytes: int = MAX_SHARD_BYTES) -> Plan:
    """The files, names and gather order of the export of `model` (its adapters merged), from shapes alone."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    # parameters and persistent buffers: a non-persistent one (rotary `inv_freq`) is rebuilt by the model
    # and would load as an unexpected key
    live = model.state_dict(keep_vars=True)
    ignored = model._keys_to_ignore_on_save or ()
    kept = remove_tied_weights_from_state_dict({n: _meta(t) for n, t in live.items() if n not in ignored}, model)
    sources = merged_sources(kept)
    exported = {name: kept[srcs[0]] for name, srcs in sources.items()}
    saved = revert_weight_conversion(model, dict(exported))
    # Which exported tensors make which saved ones: each alone, except where one saved tensor is made
    # of several (a checkpoint's fused qkv): those are gathered and converted together.
    alone = {name: revert_weight_conversion(model, {name: tensor}) for name, tensor in exported.items()}
    group_of, maker = {name: [name] for name in exported}, {}
    for name, outputs in alone.items():
        for out in outputs:
            other = group_of[maker.setdefault(out, name)]
            if other is not group_of[name]:
                joined = other + group_of[name]
                for member in joined:
                    group_of[member] = joined
    made, made_by = {}, {}
    for group in {id(g): g for g in group_of.values()}.values():
        outputs = alone[group[0]] if len(group) == 1 else revert_weight_conversion(
            model, {name: exported[name] for name in group})
        made.update(outputs)
        made_by.update(dict.fromkeys(outputs, group))
    assert [(k, t.shape, t.dtype) for k, t in sorted(made.items())] == \
        [(k, t.shape, t.dtype) for k, t in sorted(saved.items())], "the conversion does not split by weight"
    groups, seen = [], set()
    for name in saved:  # in the order the tensors are written
        group = made_by[name]
        if id(group) not in seen:
            seen.add(id(group))
            groups.append(group)

    # A fresh stand-in per saved tensor, counted at its own size (a meta view counts its base's).
    # save_pretrained counts each piece of a tensor split on saving (MoE experts) at the whole's size
    # and keeps the pieces in one file: there its shard boundaries differ from these, not the tensors.
    split = split_torch_state_dict_into_shards({k: _meta(t) for k, t in saved.items()},
                                               filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    index = None
    if split.is_sharded:
        parameters = sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters() if ".lora_" not in n)
        index = {"metadata": {"total_parameters": parameters, **split.metadata}, "weight_map": split.tensor_to_filename}
    return Plan(split.filename_to_tensors, sources, groups, index)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in storage of its own: a view (one expert of a fused tensor) would keep the whole
    base alive until its shard is written, and safetensors refuses tensors that share storage."""
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def write_weights(model, plan: Plan, folder: Path, dist: Dist, *, zero_stage: int, lora=None) -> dict:
    """Gather the planned tensors (every rank takes part), merge and convert them and write each shard
    into `folder` when complete (rank 0). -> the adapters gathered on the way, on rank 0's host."""
    import deepspeed
    from transformers.core_model_loading import revert_weight_conversion

    live = model.state_dict(keep_vars=True)
    file_of = {name: file for file, names in plan.files.items() for name in names}
    pending = {file: {} for file in plan.files}
    adapters = {}
    for group in plan.groups:
        needed = [s for name in group for s in plan.sources[name]]
        params = [live[s] for s in needed if isinstance(live[s], torch.nn.Parameter)]
        with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
            host = {s: live[s].detach().to("cpu", copy=True) for s in needed} if dist.main else None
        if not dist.main:
            continue
        values = {}
        for name in group:
            weight, *pair = (host[s] for s in plan.sources[name])
            values[name] = merge(weight, *pair, lora.lora_alpha / lora.r) if pair else weight
            adapters.update(zip(plan.sources[name][1:], pair))
        del host
        for out, tensor in revert_weight_conversion(model, values).items():
            shard = pending[file_of[out]]
            shard[out] = _own(tensor)
            if len(shard) == len(plan.files[file_of[out]]):
                save_atomic(shard, folder / file_of[out], metadata={"format": "pt"})
                shard.clear()
    return adapters


def export_final(engine, source_dir: Path, run_dir: Path, dist: Dist, *, zero_stage: int,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """run_dir/final: the trained model as a from_pretrained folder, with its processor files. Every
    rank takes part (the gathers are collective); rank 0 writes, and a failure on any rank ends all."""
    model = engine.module.model
    lora = engine.module.lora
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    with Phase(dist, "export"):
        if is_4bit(model):  # QLoRA: merge into, and export, the dequantized base in the training dtype
            model.dequantize(dtype=lm_head(model).weight.dtype)
        planned = plan_export(model, max_shard_bytes)
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        adapters = write_weights(model, planned, tmp, dist, zero_stage=zero_stage, lora=lora)
        if dist.main:
            if planned.index is not None:
                write_text_atomic(tmp / INDEX, json.dumps(planned.index, indent=2, sort_keys=True) + "\n")
            # as save_pretrained records them
            model.config.dtype = str(model.dtype).split(".")[1]
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(tmp)
            if model.can_generate():
                model.generation_config.save_pretrained(tmp)
            if lora:
                save_adapter(lora, adapters, tmp / "adapter", str(source_dir.resolve()))
            for f in source_dir.iterdir():
                if f.is_file() and not MODEL_FILES.match(f.name):
                    shutil.copy2(f, tmp / f.name)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    return final
