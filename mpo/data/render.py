"""Render a `PreferencePair` into token ids (and image tiles) with the model's own processor.

The prompt goes through the tokenizer's chat template with the generation prompt; each "<image>"
placeholder becomes the processor's image token, which the processor expands to the model's image
tokens (InternVL: "<img>" + "<IMG_CONTEXT>" x tokens-per-tile x tiles + "</img>", after its
dynamic tiling; not re-implemented here). Each response is what the chat template appends for an
assistant turn (its text and end-of-turn), i.e. the full conversation's text minus the prompt's.
Text-only models use the tokenizer alone; without a chat template, prompts are joined by blank
lines and responses end with the EOS token.

`ImageTokens` is the one place that knows how images become tokens: the model folder's
AutoProcessor when it loads, otherwise (InternVL's processor needs torchvision for its video
half) the folder's image processor and tokenizer composed with InternVL's image-token rule.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mpo.data.records import IMAGE_TOKEN, BadPair, PreferencePair


@dataclass
class RenderedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    pixel_values: torch.Tensor | None  # [tiles, 3, H, W] float32, in placeholder order
    source: str = ""
    index: int = -1  # position in the data stream
    counted_tiles: int = 0  # rendered without pixels: the tiles the images will have

    @property
    def tiles(self) -> int:
        return self.counted_tiles if self.pixel_values is None else self.pixel_values.shape[0]


MAX_IMAGE_PIXELS = 50_000_000  # data.max_image_pixels' default: far below Pillow's decompression-bomb limit


def _check_pixels(width: int, height: int, limit: int | None, ref) -> None:
    if limit is not None and width * height > limit:
        name = ref if isinstance(ref, (str, Path)) else "<bytes>"
        raise BadPair("image_too_large", f"{name}: {width}x{height} > {limit} pixels")


def load_image(ref, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, encoded bytes or a PIL image -> a decoded RGB PIL image (BadPair if unreadable, or
    larger than max_pixels: checked from the header, before decoding)."""
    try:
        if isinstance(ref, (str, Path, bytes)):
            with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
                _check_pixels(*im.size, max_pixels, ref)
                return im.convert("RGB")
        _check_pixels(*ref.size, max_pixels, ref)
        return ref.convert("RGB")
    except FileNotFoundError:
        raise BadPair("missing_image", str(ref)) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadPair("corrupt_image", f"{ref if isinstance(ref, (str, Path)) else '<bytes>'}: {e}") from None


def image_size(ref, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) of an image from its header alone (PIL opens lazily); BadPair if unreadable
    or larger than max_pixels."""
    try:
        if isinstance(ref, (str, Path, bytes)):
            with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
                width, height = im.size
        else:
            width, height = ref.size
        _check_pixels(width, height, max_pixels, ref)
        return height, width
    except FileNotFoundError:
        raise BadPair("missing_image", str(ref)) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadPair("corrupt_image", f"{ref if isinstance(ref, (str, Path)) else '<bytes>'}: {e}") from None


class ImageTokens:
    """Prompt text with one image token per image + the images -> (input ids, pixel values)."""

    def __init__(self, model_dir: str | Path, tokenizer, model_type: str):
        self.tokenizer = tokenizer
        self.processor = None
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(model_dir)
            if hasattr(processor, "image_processor"):
                self.processor = processor
        except (ImportError, AttributeError, OSError, ValueError, TypeError):
            pass  # e.g. InternVL's video processor without torchvision: compose below
        if self.processor is not None:
            self.image_token = getattr(self.processor, "image_token", None) or tokenizer.context_image_token
            self.tokens_per_tile = getattr(self.processor, "image_seq_length", None)
            self.image_processor = self.processor.image_processor
            self.default_max_patches = getattr(self.image_processor, "max_patches", None)
            self.backend = "processor"
            return
        if model_type != "internvl":
            raise ValueError(f"{model_dir}: the processor does not load and there is no fallback for "
                             f"model type {model_type!r}")
        from transformers import AutoImageProcessor

        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        config_file = Path(model_dir) / "processor_config.json"
        processor_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.tokens_per_tile = int(processor_config.get("image_seq_length", 256))
        self.default_max_patches = getattr(self.image_processor, "max_patches", None)
        self.image_token = tokenizer.context_image_token
        self.backend = "composed"

    def control_tokens(self) -> set[str]:
        """Token strings that user text must not contain: they would forge image slots."""
        tok = self.tokenizer
        names = ("start_image_token", "end_image_token", "context_image_token")
        return {self.image_token} | {t for t in (getattr(tok, n, None) for n in names) if t}

    def _image_kwargs(self, images: int, max_patches: int | None) -> dict:
        """max_patches: the pair's tile budget; several images share it as InternVL does
        (max(1, budget // images) each)."""
        budget = max_patches if max_patches is not None else self.default_max_patches
        return {"max_patches": max(1, budget // images)} if budget is not None else {}

    def count(self, prompt_text: str, sizes: list[tuple[int, int]], max_patches: int | None) -> tuple[list[int], int]:
        """(input ids, tiles) of the prompt from the images' (height, width) alone: the image
        processor's own tile count, no pixels."""
        kwargs = {"crop_to_patches": True, **self._image_kwargs(len(sizes), max_patches)}
        tiles = [self.image_processor.get_number_of_image_patches(h, w, kwargs) for h, w in sizes]
        return self._expand(prompt_text, tiles), sum(tiles)

    def encode(self, prompt_text: str, images: list, max_patches: int | None) -> tuple[list[int], torch.Tensor]:
        image_kwargs = self._image_kwargs(len(images), max_patches)
        if self.processor is not None:
            out = self.processor(text=[prompt_text], images=images, add_special_tokens=False,
                                 return_tensors="pt", **image_kwargs)
            return out["input_ids"][0].tolist(), out["pixel_values"].float()
        # InternVL's rule (what InternVLProcessor does): image i's placeholder -> <img> + context
        # token x (tokens per tile x tiles of image i) + </img>; tiles from the image processor.
        tiled = self.image_processor(images=images, crop_to_patches=True, return_tensors="pt", **image_kwargs)
        return self._expand(prompt_text, tiled["num_patches"].tolist()), tiled["pixel_values"].float()

    def _expand(self, prompt_text: str, tiles: list[int]) -> list[int]:
        tok = self.tokenizer
        parts = prompt_text.split(self.image_token)
        text = parts[0]
        for n, rest in zip(tiles, parts[1:], strict=True):
            text += tok.start_image_token + self.image_token * (self.tokens_per_tile * n) + tok.end_image_token + rest
        return tok(text, add_special_tokens=False)["input_ids"]


class Renderer:
    """Turns pairs into token ids with a model folder's tokenizer, chat template and processor."""

    def __init__(self, model_dir: str | Path, *, max_patches: int | None = None,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        from transformers import AutoConfig, AutoTokenizer

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model folder not found: {self.model_dir}")
        config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_patches, self.max_image_pixels = max_patches, max_image_pixels
        self.vision = getattr(config, "vision_config", None) is not None
        self.images = ImageTokens(model_dir, self.tokenizer, config.model_type) if self.vision else None
        # Chat markup, end-of-text, padding, image and video tokens typed into the data would forge
        # turns or image slots: every special or added token of the tokenizer, from the tokenizer.
        tok = self.tokenizer
        tokens = set(tok.all_special_tokens) | set(tok.get_added_vocab())
        tokens |= self.images.control_tokens() if self.vision else set()
        tokens = sorted(tokens - {IMAGE_TOKEN, ""}, key=len, reverse=True)  # "<image>" is the data's placeholder
        self._control_tokens = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def describe(self) -> str:
        how = f"images via {self.images.backend}" if self.images else "text-only"
        return f"{self.model_dir} ({type(self.tokenizer).__name__}, {how})"

    def render(self, pair: PreferencePair, index: int = -1, *, pixels: bool = True) -> RenderedPair:
        """pixels=False: the token ids and tile count exactly, the images read for their size only."""
        if pair.images and not self.vision:
            raise BadPair("no_vision", f"{len(pair.images)} images")
        texts = [m["content"] for m in pair.prompt] + [pair.chosen, pair.rejected]
        for text in texts if self._control_tokens is not None else ():
            if found := self._control_tokens.search(text):
                raise BadPair("bad_field", f"the text contains the control token {found.group()!r}")
        messages = self._messages(pair.prompt)
        prompt_text = self._prompt_text(messages)
        max_patches = pair.max_patches if pair.max_patches is not None else self.max_patches
        tiles = 0
        if pixels or not pair.images:
            prompt_ids, pixel_values = self._encode_prompt(prompt_text, pair.images, max_patches)
            tiles = 0 if pixel_values is None else pixel_values.shape[0]
        else:
            sizes = [image_size(ref, self.max_image_pixels) for ref in pair.images]
            (prompt_ids, tiles), pixel_values = self.images.count(prompt_text, sizes, max_patches), None
        if not prompt_ids:
            raise BadPair("bad_field", "the prompt renders to no tokens")
        chosen = self._response_ids(messages, prompt_text, pair.chosen)
        rejected = self._response_ids(messages, prompt_text, pair.rejected)
        if self.vision:
            self._check_image_slots(prompt_ids, chosen + rejected, tiles)
        return RenderedPair(prompt_ids, chosen, rejected, pixel_values, pair.source, index, tiles)

    def prompt(self, messages: list[dict] | tuple[dict, ...], images=(), max_patches: int | None = None,
               response_prefix: str = "") -> tuple[list[int], torch.Tensor | None]:
        """Token ids (and pixel values) of a prompt with the generation prompt, for sampling; with
        `response_prefix`, the assistant turn starts with that text (the model continues it)."""
        text = self._prompt_text(self._messages(messages)) + response_prefix
        return self._encode_prompt(text, images, max_patches if max_patches is not None else self.max_patches)

    def _messages(self, prompt) -> list[dict]:
        image_token = self.images.image_token if self.vision else IMAGE_TOKEN
        return [{"role": m["role"], "content": m["content"].replace(IMAGE_TOKEN, image_token)} for m in prompt]

    def _encode_prompt(self, text: str, images, max_patches: int | None):
        if images:
            if not self.vision:
                raise BadPair("no_vision", f"{len(images)} images")
            loaded = [load_image(ref, self.max_image_pixels) for ref in images]
            return self.images.encode(text, loaded, max_patches)
        return self.tokenizer(text, add_special_tokens=not self._templated)["input_ids"], None

    def _check_image_slots(self, prompt_ids, response_ids, tiles: int) -> None:
        """The model scatters one feature per image slot: a miscount would fail a whole batch."""
        slot = self.tokenizer.convert_tokens_to_ids(self.images.image_token)
        per_tile = self.images.tokens_per_tile
        want = tiles * per_tile if per_tile else None
        if slot in response_ids or (want is not None and prompt_ids.count(slot) != want):
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
