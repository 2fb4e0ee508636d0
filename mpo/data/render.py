"""Render a `PreferencePair` into token ids (and image tiles) with the model's own processor.

The prompt goes through the tokenizer's chat template with the generation prompt; each "<image>"
placeholder becomes the family's compact image form, whose one slot token is then spliced into
the model's image tokens at the id level (InternVL: "<img>" + "<IMG_CONTEXT>" x tokens-per-tile x
tiles + "</img>", the tiles from the image processor's own dynamic tiling). Each response is what
the chat template appends for an assistant turn (its text and end-of-turn), i.e. the full
conversation's text minus the prompt's.
Text-only models use the tokenizer alone; without a chat template, prompts are joined by blank
lines and responses end with the EOS token.

How images become tokens is the model family's (`mpo.families`): the model folder's image
processor sizes and tiles them, the family's rule says how many slots each one takes.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mpo.data.records import IMAGE_TOKEN, PreferencePair
from mpo.errors import BadPair
from mpo.families import family_of


@dataclass
class RenderedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    pixel_values: torch.Tensor | None  # [tiles, ...] float32, in placeholder order (Qwen-VL: patch rows)
    source: str = ""
    index: int = -1  # position in the data stream
    counted_tiles: int = 0  # rendered without pixels: the tiles the images will have
    image_grid_thw: torch.Tensor | None = None  # [images, 3] (Qwen-VL): each image's patch grid

    @property
    def tiles(self) -> int:
        return self.counted_tiles if self.pixel_values is None else self.pixel_values.shape[0]


MAX_IMAGE_PIXELS = 50_000_000  # data.max_image_pixels' default: far below Pillow's decompression-bomb limit


@dataclass(frozen=True)
class ImageOptions:
    """How images are sized: a tile budget per pair (InternVL's max_patches; a record's own budget,
    e.g. MMPR's max_dynamic_patch, wins), a pixel range per image (Qwen-VL's min_pixels /
    max_pixels), and a size limit before decoding (any model). None: the processor's own setting."""

    max_patches: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_image_pixels: int | None = MAX_IMAGE_PIXELS

    def __post_init__(self):
        for name, value in vars(self).items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")


def _check_pixels(width: int, height: int, limit: int | None, ref) -> None:
    if limit is not None and width * height > limit:
        name = ref if isinstance(ref, (str, Path)) else "<bytes>"
        raise BadPair("image_too_large", f"{name}: {width}x{height} > {limit} pixels")


def load_image(ref, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, encoded bytes or a PIL image -> a decoded RGB PIL image (BadPair if unreadable, or
    larger than max_pixels: checked from the header, before decoding)."""
    with _opened(ref, max_pixels) as im:
        return im.convert("RGB")


def image_size(ref, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) of an image from its header alone (PIL opens lazily); BadPair if unreadable
    or larger than max_pixels."""
    with _opened(ref, max_pixels) as im:
        return im.height, im.width


@contextlib.contextmanager
def _opened(ref, max_pixels: int | None):
    """The image `ref` opened lazily (header read, pixels not yet) and checked against max_pixels;
    whatever goes wrong reading it, then or while the caller decodes it, is the pair's BadPair."""
    try:
        if isinstance(ref, (str, Path, bytes)):
            with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
                _check_pixels(*im.size, max_pixels, ref)
                yield im
        else:
            _check_pixels(*ref.size, max_pixels, ref)
            yield ref
    except FileNotFoundError:
        raise BadPair("missing_image", str(ref)) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadPair("corrupt_image", f"{ref if isinstance(ref, (str, Path)) else '<bytes>'}: {e}") from None


class Renderer:
    """Turns pairs into token ids with a model folder's tokenizer, chat template and processor."""

    def __init__(self, model_dir: str | Path, images: ImageOptions | None = None):
        from transformers import AutoConfig, AutoTokenizer

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model folder not found: {self.model_dir}")
        config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.options = images or ImageOptions()
        self.family = family_of(config)
        self.vision = self.family.vision
        self.images = self.family.image_tokens(model_dir, self.tokenizer, self.options) if self.vision else None
        # Chat markup, end-of-text, padding, image and video tokens typed into the data would forge
        # turns or image slots: every special or added token of the tokenizer, from the tokenizer.
        tok = self.tokenizer
        tokens = set(tok.all_special_tokens) | set(tok.get_added_vocab())
        tokens |= self.images.control_tokens() if self.vision else set()
        tokens = sorted(tokens - {IMAGE_TOKEN, ""}, key=len, reverse=True)  # "<image>" is the data's placeholder
        self._control_tokens = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def render(self, pair: PreferencePair, index: int = -1, *, pixels: bool = True) -> RenderedPair:
        """pixels=False: the token ids and tile count exactly, the images read for their size only."""
        if pair.images and not self.vision:
            raise BadPair("no_vision", f"{len(pair.images)} images")
        self.check_text(*(m["content"] for m in pair.prompt), pair.chosen, pair.rejected)
        messages = self._messages(pair.prompt)
        prompt_text = self._prompt_text(messages)
        max_patches = pair.max_patches if pair.max_patches is not None else self.options.max_patches
        tiles, grid = 0, None
        if pixels or not pair.images:
            prompt_ids, pixel_values, grid = self._encode_prompt(prompt_text, pair.images, max_patches)
            tiles = 0 if pixel_values is None else pixel_values.shape[0]
        else:
            sizes = [image_size(ref, self.options.max_image_pixels) for ref in pair.images]
            (prompt_ids, tiles), pixel_values = self.images.count(prompt_text, sizes, max_patches), None
        if not prompt_ids:
            raise BadPair("bad_field", "the prompt renders to no tokens")
        chosen = self._response_ids(messages, prompt_text, pair.chosen)
        rejected = self._response_ids(messages, prompt_text, pair.rejected)
        if self.vision:
            self._check_image_slots(prompt_ids, chosen + rejected, tiles)
        return RenderedPair(prompt_ids, chosen, rejected, pixel_values, pair.source, index, tiles, grid)

    def check_text(self, *texts: str) -> None:
        """BadPair (bad_field) when a text holds a special or added token of the tokenizer."""
        for text in texts if self._control_tokens is not None else ():
            if found := self._control_tokens.search(text):
                raise BadPair("bad_field", f"the text contains the control token {found.group()!r}")

    def prompt(self, messages: list[dict] | tuple[dict, ...], images=(),
               response_prefix: str = "") -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Token ids, pixel values and image grid (None without images or grids) of a prompt with
        the generation prompt, for sampling; with
        `response_prefix`, the assistant turn starts with that text (the model continues it)."""
        text = self._prompt_text(self._messages(messages)) + response_prefix
        return self._encode_prompt(text, images, self.options.max_patches)

    def _messages(self, prompt) -> list[dict]:
        image_token = self.images.image_token if self.vision else IMAGE_TOKEN
        return [{"role": m["role"], "content": m["content"].replace(IMAGE_TOKEN, image_token)} for m in prompt]

    def _encode_prompt(self, text: str, images, max_patches: int | None):
        if images:
            if not self.vision:
                raise BadPair("no_vision", f"{len(images)} images")
            loaded = [load_image(ref, self.options.max_image_pixels) for ref in images]
            return self.images.encode(text, loaded, max_patches)
        return self.tokenizer(text, add_special_tokens=not self._templated)["input_ids"], None, None

    def _check_image_slots(self, prompt_ids, response_ids, tiles: int) -> None:
        """The model scatters one feature per image slot: a miscount would fail a whole batch."""
        slot = self.tokenizer.convert_tokens_to_ids(self.images.slot_token)
        want = self.images.slots(tiles)
        if slot in response_ids or prompt_ids.count(slot) != want:
            raise BadPair("image_mismatch", f"{prompt_ids.count(slot)} image slots for {want}")

    @property
    def _templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _prompt_text(self, messages: list[dict]) -> str:
        if self._templated:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def _response_ids(self, messages: list[dict], prompt_text: str, response: str) -> list[int]:
        if self._templated:
            full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                      tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError(f"{self.model_dir}: the chat template's assistant turn does not extend its "
                                 "generation prompt; cannot split prompt and response")
            text = full[len(prompt_text):]
        else:
            text = response + (self.tokenizer.eos_token or "")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
