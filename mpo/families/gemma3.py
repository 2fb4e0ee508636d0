"""Gemma 3 (transformers' Gemma3ForConditionalGeneration: a SigLIP vision tower, an average-pooling
projector, the Gemma 3 language model with sliding-window and global layers).

Images: each is resized to the vision tower's square (Gemma3ImageProcessor; pan-and-scan crops stay
off, as the processor's default: with them the prompt text itself would change with the image);
its placeholder becomes "\\n\\n<start_of_image>" + <image_soft_token> x mm_tokens_per_image +
"<end_of_image>\\n\\n" (tokenized with one soft token, then repeated), as Gemma3Processor does.
An image's tokens attend to each other in both directions (the model's `token_type_ids` mask); the
packed attention does the same for each run of soft tokens. Positions are plain 1-D.
"""

from __future__ import annotations

import torch

from mpo.families.base import ImageTokens, VisionFamily, _refusals


class Gemma3(VisionFamily):
    name = "gemma3"

    def __init__(self, config):
        super().__init__(config)
        if getattr(config.text_config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is not a causal LM")
        self.bidirectional_image_token = config.image_token_id

    @classmethod
    def matches(cls, config) -> bool:
        return config.model_type == "gemma3"

    def image_tokens(self, model_dir, tokenizer, options):
        return Gemma3Images(model_dir, tokenizer, self.config, options)

    def blank_image(self):
        size = self.config.vision_config.image_size
        return [self.config.image_token_id] * self.config.mm_tokens_per_image, torch.zeros(1, 3, size, size), None

    def generation_inputs(self, input_ids):
        return {"token_type_ids": (input_ids == self.config.image_token_id).long()}


class Gemma3Images(ImageTokens):
    def __init__(self, model_dir, tokenizer, config, options):
        self.image_token = tokenizer.boi_token
        self.slot_token = tokenizer.image_token
        self.compact_image = f"\n\n{tokenizer.boi_token}{tokenizer.image_token}{tokenizer.eoi_token}\n\n"
        super().__init__(model_dir, tokenizer, config, options)
        self.tokens_per_image = config.mm_tokens_per_image

    def control_tokens(self) -> set[str]:
        return {self.slot_token, self.tokenizer.boi_token, self.tokenizer.eoi_token}

    def count(self, prompt_text, sizes, budget):
        return self._ids(prompt_text, [1] * len(sizes)), len(sizes)

    def encode(self, prompt_text, images, budget):
        with _refusals([(im.height, im.width) for im in images]):
            out = self.image_processor(images=images, return_tensors="pt", do_pan_and_scan=False)
        return self._ids(prompt_text, [1] * len(images)), out["pixel_values"].float(), None

    def slots(self, tiles: int) -> int:
        return tiles * self.tokens_per_image
