"""LoRA through peft: low-rank adapters injected into the model in place, the base weights frozen.

`add_lora` injects peft's LoRA layers (`inject_adapter_in_model`, no wrapper class: the model keeps
its own forward, so packed rows and the fused LM head work unchanged) into the language model's
linear layers (the model family's, the LM head excluded) or the named `target_modules`, and leaves
only the adapters and `modules_to_save` trainable. Checkpoints then hold only those weights and
their optimizer state. At the end the export folds each adapter into its base weight
(`merge`: W + alpha / r * B A) under the base model's own names (`merged_sources`), one layer at a
time, so `final/` loads with plain `from_pretrained`, and `adapter_state` gives the adapter in
peft's file layout for `final/adapter/`.
`adapters_disabled` runs the model as its base alone: with nothing but adapters trained, that is
the initial policy, so an online reference needs no second copy of the model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mpo.atomic import save_atomic, write_text_atomic
from mpo.families import family_of

ADAPTER = "default"  # peft's adapter name for the only adapter


def default_targets(model) -> list[str]:
    """The language model's linear layers (the LM head excluded): full module names."""
    head = model.get_output_embeddings()
    language = family_of(model.config).parts(model)["language"]
    inside = {id(m) for part in language for m in part.modules()}
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and id(m) in inside and m is not head]


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str], modules_to_save: list[str]):
    """Inject the adapters and freeze everything else; -> peft's LoraConfig (for the export)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules) or default_targets(model))
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # e.g. a target module that does not exist
        raise ValueError(f"lora.target_modules: {e}") from None
    saved = {name: m for name, m in model.named_modules() if any(_is(name, t) for t in modules_to_save)}
    missing = [t for t in modules_to_save if not any(_is(name, t) for name in saved)]
    if missing:
        raise ValueError(f"lora.modules_to_save: no module named {missing} in {type(model).__name__}")
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    for m in saved.values():
        m.requires_grad_(True)
    return config


@contextlib.contextmanager
def adapters_disabled(model):
    """Every LoRA layer of `model` computes its base layer alone inside the block. peft's toggle also
    clears the adapters' requires_grad and sets it again on the way out; the flags are restored as
    they were (a frozen adapter stays frozen), and the parameters stay the same tensors, so the
    optimizer and DeepSpeed's gradient hooks are untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _is(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def merged_sources(names) -> dict[str, tuple[str, ...]]:
    """The adapted model's parameter and buffer names -> the base model's, each with the names its
    tensor is made from: an adapted layer's weight from (base weight, A, B), anything else from itself.
    The adapters themselves have no name of their own in the base model."""
    out = {}
    for name in names:
        if ".lora_" in name:
            continue
        sources = (name,)
        if ".base_layer." in name:
            layer, _, leaf = name.partition(".base_layer.")
            if leaf == "weight":
                sources = (name, f"{layer}.lora_A.{ADAPTER}.weight", f"{layer}.lora_B.{ADAPTER}.weight")
            name = f"{layer}.{leaf}"
        out[name] = sources
    return out


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A, summed in float64 and returned in W's dtype."""
    return (weight.double() + scaling * (b.double() @ a.double())).to(weight.dtype)


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved names (`base_model.model.<module>.lora_A.weight`)."""
    return {"base_model.model." + name.replace(f".{ADAPTER}.", "."): t for name, t in state.items() if ".lora_" in name}


def save_adapter(config, state: dict[str, torch.Tensor], folder: Path, base_model: str) -> None:
    """peft's adapter folder: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = config.to_dict()
    settings.update(base_model_name_or_path=base_model, peft_type="LORA",
                    target_modules=sorted(settings["target_modules"]))
    write_text_atomic(folder / "adapter_config.json", json.dumps(settings, indent=2, default=str) + "\n")
    save_atomic({k: v.contiguous() for k, v in adapter_state(state).items()}, folder / "adapter_model.safetensors")
