"""InternVL (transformers' InternVLForConditionalGeneration: InternViT, pixel-shuffle projector, a
Qwen2 or InternLM language model).

Images: dynamic tiling by the GotOcr2 image processor (up to `max_patches` tiles + a thumbnail;
several images in one prompt share the budget as InternVL does: max(1, budget // images) each);
each image's placeholder becomes <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>
(tokenized as <img><IMG_CONTEXT></img>, the one slot then repeated).
Positions are plain 1-D.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mpo.families.base import ImageTokens, VisionFamily


class InternVL(VisionFamily):
    name = "internvl"

    @classmethod
    def matches(cls, config) -> bool:
        return config.model_type == "internvl"

    def image_tokens(self, model_dir, tokenizer, options):
        return InternVLImages(model_dir, tokenizer, self.config, options)

    def blank_image(self):
        vision = self.config.vision_config
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        tokens = self.config.image_seq_length or int((size // patch) ** 2 * self.config.downsample_ratio ** 2)
        return [self.config.image_token_id] * tokens, torch.zeros(1, 3, size, size), None


class InternVLImages(ImageTokens):
    knobs = ("max_patches",)

    def __init__(self, model_dir, tokenizer, config, options):
        self.image_token = self.slot_token = tokenizer.context_image_token
        self.compact_image = tokenizer.start_image_token + self.slot_token + tokenizer.end_image_token
        super().__init__(model_dir, tokenizer, config, options)
        # what InternVLProcessor reads: processor_config.json's image_seq_length, else its default
        path = Path(model_dir) / "processor_config.json"
        self.tokens_per_tile = int((json.loads(path.read_text()) if path.is_file() else {})
                                   .get("image_seq_length", 256))
        self.default_max_patches = getattr(self.image_processor, "max_patches", None)

    def control_tokens(self) -> set[str]:
        tok = self.tokenizer
        return {self.slot_token, tok.start_image_token, tok.end_image_token}

    def slots(self, tiles: int) -> int:
        return tiles * self.tokens_per_tile

    def _image_kwargs(self, images: int, budget: int | None) -> dict:
        budget = budget if budget is not None else self.default_max_patches
        return {"crop_to_patches": True, **({"max_patches": max(1, budget // images)} if budget is not None else {})}
