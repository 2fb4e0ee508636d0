"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers' Qwen*VLForConditionalGeneration).

Images: the Qwen2-VL image processor resizes each image to a multiple of patch x merge pixels
within its min_pixels / max_pixels and cuts it into patches (`image_grid_thw` = (1, h, w) patches
per image); in the prompt an image is <|vision_start|><|image_pad|><|vision_end|> and the pad
becomes h * w / merge^2 pads, one per merged patch. The vision tower's `merger` (and Qwen3-VL's
deepstack mergers) is the projector.

Positions are M-RoPE: three rows (temporal, height, width), from the model's own `get_rope_index`
per document, so a packed document gets exactly the ids it has when run alone. Three rows, not
four: the language model then derives no mask from them (our packed attention needs none). The
method belongs to the base model, built for it once per family as a skeleton on the meta device
(no memory, about a second at 72B): the model's own code, not a copy of it.
"""

from __future__ import annotations

import functools
import itertools

import torch

from mpo.families.base import ImageTokens, VisionFamily

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


class QwenVL(VisionFamily):
    name = "qwen_vl"
    position_rows = 3
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

    @classmethod
    def matches(cls, config) -> bool:
        return config.model_type in cls.model_types

    def parts(self, model):
        visual = model.model.visual
        children = dict(visual.named_children())
        return {"vision": [m for n, m in children.items() if "merger" not in n],
                "projector": [m for n, m in children.items() if "merger" in n],
                "language": [model.model.language_model, model.lm_head]}

    encoder_outputs = ("pooler_output", "deepstack_features")  # merged features (and Qwen3-VL's deepstack)

    def image_encoder(self, model):
        return model.model.visual  # the merger included: its output is the features

    def encoder_images(self, args, kwargs):
        # pixel_values: every image's patches one after another, grid_thw: each image's (t, h, w) patches
        pixels, grid = args[0], kwargs["grid_thw"]
        rows = grid.prod(-1).tolist()
        starts = [0, *itertools.accumulate(rows)]

        def take(first, stop):
            return (pixels[starts[first]:starts[stop]], *args[1:]), {**kwargs, "grid_thw": grid[first:stop]}

        return rows, take

    def image_tokens(self, model_dir, tokenizer, options):
        return QwenVLImages(model_dir, tokenizer, self.config, options)

    @functools.cached_property
    def _skeleton(self):
        from transformers import AutoModel

        with torch.device("meta"):
            return AutoModel.from_config(self.config)

    def positions(self, ids, grid):
        ids = torch.tensor([ids])
        kinds = (ids == self.config.image_token_id).int()
        return self._skeleton.get_rope_index(ids, kinds, image_grid_thw=grid)[0][:, 0]

    def blank_image(self):
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        return [self.config.image_token_id], torch.zeros(merge * merge, width), torch.tensor([[1, merge, merge]])

    def generation_inputs(self, input_ids):
        return {"mm_token_type_ids": (input_ids == self.config.image_token_id).int()}


class QwenVLImages(ImageTokens):
    image_token = compact_image = VISION_START + IMAGE_PAD + VISION_END
    slot_token = IMAGE_PAD
    knobs = ("min_pixels", "max_pixels")

    def __init__(self, model_dir, tokenizer, config, options):
        super().__init__(model_dir, tokenizer, config, options)
        self.merge = config.vision_config.spatial_merge_size
        size = self.image_processor.size  # the processor's own pixel range, unless the options narrow it
        self.size = {"shortest_edge": options.min_pixels or size.shortest_edge,
                     "longest_edge": options.max_pixels or size.longest_edge}
        if self.size["shortest_edge"] > self.size["longest_edge"]:
            raise ValueError(f"{model_dir}: min_pixels {self.size['shortest_edge']} is above max_pixels "
                             f"{self.size['longest_edge']}")

    def _image_kwargs(self, images: int, budget: int | None) -> dict:
        return {"size": self.size}

    def control_tokens(self) -> set[str]:
        return {VISION_START, IMAGE_PAD, VISION_END}

    def slots(self, tiles: int) -> int:
        return tiles // self.merge ** 2
