"""Model families: everything specific to one kind of model, one file each.

`family_of(config)` picks the first family whose `matches(config)` holds, else the generic text
family. Adding a family (LLaVA-OneVision, Idefics3, ...) is one new file with a `Family` subclass
(module roles, `ImageTokens` subclass with its compact image form and slot count, positions,
blank image) listed in FAMILIES, and its tiny model in `mpo.models.tiny` for the tests.
"""

from __future__ import annotations

from mpo.families.base import Family, ImageTokens
from mpo.families.gemma3 import Gemma3
from mpo.families.internvl import InternVL
from mpo.families.qwen_vl import QwenVL

FAMILIES = (InternVL, QwenVL, Gemma3)


def family_of(config) -> Family:
    for cls in FAMILIES:
        if cls.matches(config):
            return cls(config)
    if not Family.matches(config):
        raise ValueError(f"model type {config.model_type!r}: vision-language models of this family are not "
                         f"supported (supported: {', '.join(c.name for c in FAMILIES)} and text causal LMs)")
    return Family(config)


__all__ = ["FAMILIES", "Family", "Gemma3", "ImageTokens", "InternVL", "QwenVL", "family_of"]
