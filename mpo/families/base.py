"""The generic family (text causal LMs: Llama, Qwen2, SmolLM, ...) and the base every family extends.

A `Family` answers what the trainer needs to know about one kind of model: which modules are the
vision tower, the projector and the language model (freezing, MFU), how images become tokens
(`ImageTokens`), the position ids of a packed document, and the blank image that keeps an
image-less row on the vision path. A text LM has no images and plain 1-D positions.

`ImageTokens` is the shared half of every vision family's image handling: the model folder's image
processor sizes the images (pixels, or from image sizes alone its `get_number_of_image_patches`,
for the cost pass), and the token ids are the processor's, built at the id level: the prompt is
tokenized with each image in its compact form (one slot token) and each image's slot then becomes
its `slots` copies. The processor spells every slot out in a string and tokenizes that: thousands
of tokens an image at real sizes, most of an image pair's cost pass. The ids are the same because
the slot is an added token (checked at start): the tokenizer splits the text at it and never merges
it with what is around it. A family states only its rule: the compact form and the slot count.
"""

from __future__ import annotations

import contextlib

import torch

from mpo.errors import BadPair


class Family:
    name = "text"
    vision = False
    position_rows = 1  # rows of position ids per token (M-RoPE: 3)
    bidirectional_image_token: int | None = None  # an image's tokens attend to each other both ways (Gemma 3)

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


class VisionFamily(Family):
    """A vision-language model as transformers builds them (`AutoModelForImageTextToText`): the vision
    tower stays on SDPA (packing changes nothing there: an image is one sequence), the language
    model takes the packed attention."""

    vision = True

    def auto_class(self):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def attention(self, name: str):
        return {"text_config": name, "vision_config": "sdpa"}

    def parts(self, model):
        """transformers' usual layout (InternVL, Gemma 3): model.model.{vision_tower,
        multi_modal_projector, language_model} and the head."""
        inner = model.model
        return {"vision": [inner.vision_tower], "projector": [inner.multi_modal_projector],
                "language": [inner.language_model, model.lm_head]}

    # the image encoder's output fields the model reads (sequence parallelism gathers these)
    encoder_outputs: tuple[str, ...] = ("last_hidden_state", "hidden_states")

    def image_encoder(self, model) -> torch.nn.Module:
        """The module that turns a row's pixels into features, image by image (tile by tile): under
        sequence parallelism each rank of a group runs it on its share of the row's images."""
        return model.model.vision_tower

    def encoder_images(self, args: tuple, kwargs: dict):
        """The image encoder's call -> (each image's input rows, `take(first, stop)`: the same call on
        images first..stop-1 alone, as (args, kwargs)). Here a tile or image per row of pixel_values."""
        pixels = kwargs["pixel_values"]
        return [1] * len(pixels), lambda first, stop: (args, {**kwargs, "pixel_values": pixels[first:stop]})


class ImageTokens:
    """A prompt text with `image_token` once per image + the images -> (input ids, pixel values, grid)."""

    image_token: str  # what each data "<image>" placeholder becomes in the prompt text
    compact_image: str  # one image's markup with a single slot: what `image_token` is tokenized as
    slot_token: str  # the token that receives one image feature
    knobs: tuple[str, ...] = ()  # the ImageOptions sizing fields the family's processor has

    def __init__(self, model_dir, tokenizer, config, options):
        from transformers import AutoImageProcessor

        foreign = [k for k in ("max_patches", "min_pixels", "max_pixels") if getattr(options, k) is not None
                   and k not in self.knobs]
        if foreign:
            raise ValueError(f"{model_dir}: {', '.join(foreign)} does not apply to {config.model_type} models "
                             f"(their image processor takes {' / '.join(self.knobs) or 'no sizing option'})")
        self.tokenizer, self.config, self.options = tokenizer, config, options
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        if self.slot_token not in tokenizer.get_added_vocab():
            raise ValueError(f"{model_dir}: {self.slot_token!r} is not one of the tokenizer's added tokens")
        self.slot_id = tokenizer.convert_tokens_to_ids(self.slot_token)

    def control_tokens(self) -> set[str]:
        """Token strings user text must not contain: they would forge image slots."""
        return {self.slot_token}

    def count(self, prompt_text: str, sizes: list[tuple[int, int]], budget: int | None) -> tuple[list[int], int]:
        """(input ids, tiles) of the prompt from the images' (height, width) alone, no pixels."""
        kwargs = self._image_kwargs(len(sizes), budget)
        with _refusals(sizes):
            tiles = [self.image_processor.get_number_of_image_patches(h, w, kwargs) for h, w in sizes]
        return self._ids(prompt_text, tiles), sum(tiles)

    def encode(self, prompt_text: str, images: list, budget: int | None):
        """(input ids, pixel values [tiles, ...], image grid or None) of the prompt and its images."""
        kwargs = self._image_kwargs(len(images), budget)
        with _refusals([(im.height, im.width) for im in images]):
            out = self.image_processor(images=images, return_tensors="pt", **kwargs)
        grid = out.get("image_grid_thw")
        tiles = grid.prod(-1).tolist() if grid is not None else out["num_patches"].tolist()
        return self._ids(prompt_text, tiles), out["pixel_values"].float(), grid

    def slots(self, tiles: int) -> int:
        """Image slots in a prompt whose images have `tiles` tiles (patches) in all."""
        raise NotImplementedError

    def _image_kwargs(self, images: int, budget: int | None) -> dict:
        return {}

    def _ids(self, prompt_text: str, tiles: list[int]) -> list[int]:
        """The processor's input ids for images of `tiles` tiles (patches) each."""
        ids = self.tokenizer(prompt_text.replace(self.image_token, self.compact_image),
                             add_special_tokens=False)["input_ids"]
        return splice(ids, self.slot_id, [self.slots(n) for n in tiles])


def splice(ids: list[int], slot: int, counts: list[int]) -> list[int]:
    """`ids` with its k-th `slot` token repeated counts[k] times."""
    at = [i for i, t in enumerate(ids) if t == slot]
    if len(at) != len(counts):
        raise BadPair("image_mismatch", f"{len(at)} image placeholders for {len(counts)} images")
    out, start = [], 0
    for i, n in zip(at, counts):
        out += ids[start:i]
        out += [slot] * n
        start = i + 1
    return out + ids[start:]


@contextlib.contextmanager
def _refusals(sizes: list[tuple[int, int]]):
    """An image the processor refuses (ValueError) is the pair's reject, not the run's crash."""
    try:
        yield
    except ValueError as e:
        raise BadPair("image_refused", f"{[f'{w}x{h}' for h, w in sizes]}: {e}") from None
