"""The generic family (text causal LMs: Llama, Qwen2, SmolLM, ...) and the base every family extends.

A `Family` answers what the trainer needs to know about one kind of model: which modules are the
vision tower, the projector and the language model (freezing, MFU), how images become tokens
(`ImageTokens`), the position ids of a packed document, and the blank image that keeps an
image-less row on the vision path. A text LM has no images and plain 1-D positions.

`ImageTokens` is the shared half of every vision family's image handling: the model folder's
AutoProcessor renders where it loads; otherwise (processors whose video half needs torchvision)
the folder's image processor and tokenizer are composed with the family's own expansion rule,
`_expand`. Token counts for the cost pass come from the image processor's
`get_number_of_image_patches`, from image sizes alone.
"""

from __future__ import annotations

import contextlib

import torch

from mpo.data.records import BadPair


class Family:
    name = "text"
    vision = False
    position_rows = 1  # rows of position ids per token (M-RoPE: 3)

    def __init__(self, config):
        self.config = config

    @classmethod
    def matches(cls, config) -> bool:
        return getattr(config, "vision_config", None) is None

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def attention(self, name: str):
        """The `set_attn_implementation` argument that puts the language model on attention `name`."""
        return name

    def parts(self, model) -> dict[str, list[torch.nn.Module]]:
        """Modules by role (model.freeze_*, MFU): vision, projector, language (the LM head included)."""
        return {"vision": [], "projector": [], "language": [model]}

    def image_tokens(self, model_dir, tokenizer, options) -> ImageTokens | None:
        return None

    def positions(self, ids: list[int], grid: torch.Tensor | None) -> torch.Tensor:
        """Position ids [position_rows, n] of one document's tokens run alone (images: `grid`)."""
        return torch.arange(len(ids))[None]

    def blank_image(self) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
        """(token ids, pixel values, image grid or None) of the smallest image the vision tower takes."""
        raise NotImplementedError(f"{self.name} models have no vision tower")

    def generation_inputs(self, input_ids: torch.Tensor) -> dict:
        """Extra `generate` inputs the family derives from the prompt ids."""
        return {}


class ImageTokens:
    """A prompt text with `image_token` once per image + the images -> (input ids, pixel values, grid)."""

    image_token: str  # what each data "<image>" placeholder becomes in the prompt text
    slot_token: str  # the token that receives one image feature
    knobs: tuple[str, ...] = ()  # the ImageOptions sizing fields the family's processor has

    def __init__(self, model_dir, tokenizer, config, options):
        from transformers import AutoImageProcessor, AutoProcessor

        foreign = [k for k in ("max_patches", "min_pixels", "max_pixels") if getattr(options, k) is not None
                   and k not in self.knobs]
        if foreign:
            raise ValueError(f"{model_dir}: {', '.join(foreign)} does not apply to {config.model_type} models "
                             f"(their image processor takes {' / '.join(self.knobs) or 'no sizing option'})")
        self.tokenizer, self.config, self.options, self.processor = tokenizer, config, options, None
        try:
            processor = AutoProcessor.from_pretrained(model_dir)
            if hasattr(processor, "image_processor"):
                self.processor = processor
        except (ImportError, AttributeError, OSError, ValueError, TypeError):
            pass  # e.g. a video processor without torchvision: compose below
        self.image_processor = (self.processor.image_processor if self.processor is not None
                                else AutoImageProcessor.from_pretrained(model_dir))
        self.backend = "processor" if self.processor is not None else "composed"

    def control_tokens(self) -> set[str]:
        """Token strings user text must not contain: they would forge image slots."""
        return {self.slot_token}

    def count(self, prompt_text: str, sizes: list[tuple[int, int]], budget: int | None) -> tuple[list[int], int]:
        """(input ids, tiles) of the prompt from the images' (height, width) alone, no pixels."""
        kwargs = self._image_kwargs(len(sizes), budget)
        with _refusals(sizes):
            tiles = [self.image_processor.get_number_of_image_patches(h, w, kwargs) for h, w in sizes]
        return self._expand(prompt_text, tiles), sum(tiles)

    def encode(self, prompt_text: str, images: list, budget: int | None):
        kwargs = self._image_kwargs(len(images), budget)
        if self.processor is not None:
            with _refusals([(im.height, im.width) for im in images]):
                out = self.processor(text=[prompt_text], images=images, add_special_tokens=False,
                                     return_tensors="pt", **kwargs)
            return out["input_ids"][0].tolist(), out["pixel_values"].float(), out.get("image_grid_thw")
        with _refusals([(im.height, im.width) for im in images]):
            out = self.image_processor(images=images, return_tensors="pt", **kwargs)
        grid = out.get("image_grid_thw")
        tiles = grid.prod(-1).tolist() if grid is not None else out["num_patches"].tolist()
        return self._expand(prompt_text, tiles), out["pixel_values"].float(), grid

    def slots(self, tiles: int) -> int:
        """Image slots in a prompt whose images have `tiles` tiles (patches) in all."""
        raise NotImplementedError

    def _image_kwargs(self, images: int, budget: int | None) -> dict:
        return {}

    def _expand(self, prompt_text: str, tiles: list[int]) -> list[int]:
        """The processor's rule: each image token of the text -> that image's tokens; -> ids."""
        raise NotImplementedError


@contextlib.contextmanager
def _refusals(sizes: list[tuple[int, int]]):
    """An image the processor refuses (ValueError) is the pair's reject, not the run's crash."""
    try:
        yield
    except ValueError as e:
        raise BadPair("image_refused", f"{[f'{w}x{h}' for h, w in sizes]}: {e}") from None
