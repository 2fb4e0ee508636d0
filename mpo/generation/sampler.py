"""Batched sampling with the model's own `generate`, prompts rendered as the trainer renders them.

Prompts go through `mpo.data.render.Renderer.prompt` (chat template, the model family's image
tokens and pixels), so a sampled response is scored later in exactly the context it was sampled in. A batch
is left-padded; a vision-language batch passes the tiles of all its prompts in prompt order (the
model fills its image slots in that order). Each request is its own row, never expanded with
`num_return_sequences`: that would repeat each prompt's tiles in place and break the order.
Sampling is seeded per batch from (seed, the batch's request keys): a rerun of the same batch
draws the same responses. A prompt that cannot be rendered (an unreadable image, ...) does not
stop the batch: its result is the `BadPair` saying why, for the builder to count. A completion that
hit `max_new_tokens` before an end-of-turn token is marked `truncated`: it may look finished ("Final
answer: 26") and go on rambling, so it is no example of a good response.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mpo.data.render import ImageOptions, Renderer
from mpo.errors import BadPair


@dataclass(frozen=True)
class Completion:
    text: str
    truncated: bool  # ended by max_new_tokens, not by an end-of-turn token


@dataclass(frozen=True)
class Request:
    key: str  # identifies the request in the seed (prompt id and sample number)
    messages: tuple[dict, ...]
    images: tuple = ()
    response_prefix: str = ""


class Sampler:
    """Samples from `model` (already on `device`); `Sampler.load` reads one from a folder.
    `synced` keeps every rank stepping until all ranks' batches are done (ZeRO-3 gathers each
    layer's weights collectively, so a rank that stops early would leave the others waiting); every
    rank must then pass `generate` as many requests, so that all run as many batches."""

    def __init__(self, model, renderer: Renderer, *, device: torch.device, dtype: torch.dtype,
                 max_new_tokens: int = 512, batch_size: int = 16, synced: bool = False):
        self.renderer, self.model = renderer, model
        self.device, self.dtype, self.synced = device, dtype, synced
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        tok = self.renderer.tokenizer
        ends = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None}
        configured = self.model.generation_config.eos_token_id
        ends |= set(configured if isinstance(configured, list) else [configured])
        self.eos = sorted(e for e in ends if e is not None)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]

    @classmethod
    def load(cls, model_dir: str | Path, *, device: torch.device, dtype: torch.dtype | None = None,
             images: ImageOptions | None = None, **options) -> Sampler:
        renderer = Renderer(model_dir, images)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = renderer.family.auto_class().from_pretrained(model_dir, dtype=dtype).to(device).eval()
        return cls(model, renderer, device=device, dtype=dtype, **options)

    def generate(self, requests: list[Request], *, temperature: float = 1.0,
                 seed: int = 0) -> list[Completion | BadPair]:
        """One completion per request (decoded, special tokens dropped), in request order."""
        out = []
        for lo in range(0, len(requests), self.batch_size):
            out += self._batch(requests[lo:lo + self.batch_size], temperature, seed)
        return out

    @torch.no_grad()
    def _batch(self, requests: list[Request], temperature: float, seed: int) -> list[Completion | BadPair]:
        results: list[Completion | BadPair | None] = [None] * len(requests)
        encoded, rows = [], []
        for k, r in enumerate(requests):
            try:
                encoded.append(self.renderer.prompt(r.messages, r.images, response_prefix=r.response_prefix))
                rows.append(k)
            except BadPair as bad:
                results[k] = bad
        if self.synced and (not encoded or self.renderer.vision and all(pv is None for _, pv, _ in encoded)):
            encoded.append(self._stand_in())  # sampled, never answered: `rows` has no entry for it
        elif not encoded:
            return results
        width = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for k, (ids, _, _) in enumerate(encoded):
            input_ids[k, width - len(ids):] = torch.tensor(ids)
            mask[k, width - len(ids):] = 1
        tiles = [pv for _, pv, _ in encoded if pv is not None]
        grids = [grid for _, _, grid in encoded if grid is not None]
        kwargs = self.renderer.family.generation_inputs(input_ids)
        if tiles:
            kwargs["pixel_values"] = torch.cat(tiles).to(self.dtype)
        if grids:
            kwargs["image_grid_thw"] = torch.cat(grids)
        kwargs = {k: v.to(self.device) for k, v in kwargs.items()}
        digest = hashlib.sha256(f"{seed}|{'|'.join(r.key for r in requests)}".encode()).digest()
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        # a forked random state: sampling inside a training run must not move the trainer's
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int.from_bytes(digest[:8], "little"))
            generated = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad,
                synced_gpus=self.synced, **sampling, **kwargs)
        new = generated[:, width:].cpu()
        for k, (ids, _, _), row in zip(rows, encoded, new):
            ends = [j for j, t in enumerate(row.tolist()) if t in self.eos]
            kept = row[:ends[0]].tolist() if ends else row.tolist()
            text = self._decode(ids[-1], kept) if requests[k].response_prefix else self._decode(None, kept)
            results[k] = Completion(text, truncated=not ends)
        return results

    def _stand_in(self) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """A prompt for a synced batch that would otherwise skip a module the other ranks run: every
        layer's weights are gathered by all ranks together, so a rank whose prompts all failed to
        render must still generate, and a vision model's text-only batch must still run the vision
        tower (on the family's blank image) in case another rank's batch holds images."""
        if self.renderer.vision:
            return self.renderer.family.blank_image()
        return [self.pad], None, None

    def _decode(self, last_prompt_id: int | None, ids: list[int]) -> str:
        """New tokens as text. A continuation is decoded after the prompt's last token and that
        token's text removed: SentencePiece decoders drop a leading space at the start of a text,
        which would glue the continuation's first word to the prefix."""
        tok = self.renderer.tokenizer
        if last_prompt_id is None:
            return tok.decode(ids, skip_special_tokens=True)
        head = tok.decode([last_prompt_id], skip_special_tokens=True)
        full = tok.decode([last_prompt_id, *ids], skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else tok.decode(ids, skip_special_tokens=True)
