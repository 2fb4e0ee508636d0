"""4-bit base weights for QLoRA (`model.load_in_4bit`): bitsandbytes NF4 under frozen LoRA adapters.

The language model's linear layers are stored as NF4 with double quantization and compute in the
training dtype; the vision tower, the projector and the LM head stay unquantized (the model
family's module roles name them): the fused loss reads the LM-head weight directly, so it must be
a plain matrix, and the vision side is small next to the language model.

peft's `prepare_model_for_kbit_training` is not applied: it casts every unquantized parameter
(LM head, embeddings, vision tower) to fp32, which would put the fused head on fp32 weights beside
16-bit hidden states and double those parts' memory, and it switches gradient checkpointing on
regardless of `model.gradient_checkpointing`. What it does besides (freezing the base) `add_lora`
already does; norms stay in the training dtype, as in a LoRA run without quantization.

The packed 4-bit weights cannot be partitioned by ZeRO-3, so QLoRA runs at ZeRO stage 0 (each rank
holds the whole 4-bit model; only the adapters train). The final export dequantizes them: `final/`
holds the merged model in the training dtype (dequantized W + alpha / r * B A), not a 4-bit one.
"""

from __future__ import annotations

import importlib.util
import re

import torch

from mpo.families import family_of


def require_4bit(device: torch.device) -> None:
    """Refuse a 4-bit run early (before data and models load) where it cannot run."""
    if device.type != "cuda":
        raise ValueError(f"model.load_in_4bit: 4-bit (QLoRA) weights need a CUDA device for bitsandbytes' "
                         f"kernels; this run is on {device.type}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("model.load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")


def kept_unquantized(cls, config) -> list[str]:
    """Names of the modules left unquantized (vision tower, projector, LM head), found on a skeleton
    of the model on the meta device (no weights allocated); as regexes anchored by transformers."""
    with torch.device("meta"):
        skeleton = cls.from_config(config)
    parts = family_of(config).parts(skeleton)
    keep = {id(m) for m in [*parts["vision"], *parts["projector"], skeleton.get_output_embeddings()] if m is not None}
    return [re.escape(name) for name, m in skeleton.named_modules() if id(m) in keep]


def bnb_4bit(cls, config, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for NF4 base weights computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=kept_unquantized(cls, config))


def is_4bit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))

