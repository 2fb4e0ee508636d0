"""Attention over packed rows for HF models, through transformers' attention registries.

`register()` adds ATTENTION ("mpo_packed") to transformers' AttentionInterface, with a mask
function that returns None so transformers builds no causal mask of its own; the model is then
switched to it with `set_attn_implementation` (the language model only, for vision-language
models) and every forward passes `packing=PackingInfo(...)`, which transformers hands through
to the attention function unchanged. No model code is copied or patched.

Token j may attend to token k when both are in the same document, k <= j, and not (j is in the
rejected branch and k in the chosen branch) - exactly each pair's own computation. Two model
features extend it as the stock masks do: a sliding-window layer (Gemma 3's local layers) also needs
j - k < window, the distance counted in the pair's own sequence (a rejected token is as far from
the prompt as when run alone, not as far as the chosen branch between them in the row makes it);
and where the family attends bidirectionally within an image (Gemma 3), j may also attend to any k
of the same image, later ones included. Backends:
- flash-attn varlen (`flash_attn_varlen_func`, causal per document): plain layout only, no window,
  no image block, CUDA, 16-bit, when flash-attn is installed;
- FlexAttention with a block mask from the document, branch, image block ids and window (either
  layout, CUDA; also runs, uncompiled, on CPU for tests);
- SDPA with an explicit boolean [L, L] mask (CPU and tests; memory grows with L^2).
Attention sinks (GPT-OSS: a learned per-head logit in every softmax's denominator) are applied
exactly: FlexAttention returns each row's log-sum-exp, and the output is rescaled by
e^lse / (e^lse + e^sink); the SDPA path computes the softmax with the sink column itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mpo.data.packing import CHOSEN, REJECTED, PackedBatch

ATTENTION = "mpo_packed"
BACKENDS = ("auto", "flash", "flex", "sdpa")


@dataclass(eq=False)
class PackingInfo:
    """A packed row's structure, handed to every attention layer via the `packing=` kwarg."""

    doc_ids: torch.Tensor  # [1, L]
    branch_ids: torch.Tensor  # [1, L]
    cu_seqlens: torch.Tensor  # [documents + 1] int32
    max_seqlen: int  # the longest document (host-side, so no layer syncs to find it)
    branched: bool  # any rejected branch (prefix layout): per-document causal attention is not enough
    backend: str = "auto"
    image_blocks: torch.Tensor | None = None  # [1, L] the image a token belongs to, -1 for text (bidirectional images)
    # sequence parallelism: (part, parts), Ulysses hands this rank the part-th of `parts` runs of the heads
    heads: tuple[int, int] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, batch: PackedBatch, backend: str = "auto", image_token: int | None = None,
           heads: tuple[int, int] | None = None) -> PackingInfo:
        """image_token: the family attends bidirectionally within each run of these tokens (one image);
        heads: (part, parts) under sequence parallelism."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        bounds = batch.cu_seqlens.cpu()
        blocks = None
        if image_token is not None:
            image = batch.input_ids == image_token
            starts = image & ~F.pad(image, (1, 0))[:, :-1]
            blocks = torch.where(image, starts.cumsum(1) - 1, -1)
        return cls(batch.doc_ids, batch.branch_ids, batch.cu_seqlens, int((bounds[1:] - bounds[:-1]).max()),
                   batch.layout == "prefix", backend, blocks, heads)

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _ids(self, device):
        """(document, branch, image block or None, index in the pair's own sequence) of each token."""
        def build():
            doc, branch = self.doc_ids[0].to(device), self.branch_ids[0].to(device)
            at = torch.arange(doc.numel(), device=device)
            docs = int(doc.max()) + 1
            start = torch.full((docs,), doc.numel(), device=device).scatter_reduce(0, doc, at, "amin")
            chosen = torch.zeros(docs, dtype=torch.long, device=device).index_add_(
                0, doc, (branch == CHOSEN).long())
            index = at - start[doc] - torch.where(branch == REJECTED, chosen[doc], 0)
            blocks = None if self.image_blocks is None else self.image_blocks[0].to(device)
            return doc, branch, blocks, index
        return self._cached(("ids", device), build)

    def _allowed(self, device, window: int | None):
        """mask(q, kv) -> bool, elementwise over index tensors (the SDPA mask and FlexAttention's mask_mod)."""
        doc, branch, blocks, index = self._ids(device)

        def allowed(q, kv):
            ok = (kv <= q) & ~((branch[q] == REJECTED) & (branch[kv] == CHOSEN))
            if blocks is not None:
                ok = ok | ((blocks[q] == blocks[kv]) & (blocks[q] >= 0))
            if window is not None:
                ok = ok & (index[q] - index[kv] < window)
            return ok & (doc[q] == doc[kv])
        return allowed

    def bool_mask(self, device, window: int | None = None) -> torch.Tensor:
        """[1, 1, L, L]: True where attention is allowed (built once per row and window, shared by the layers)."""
        def build():
            at = torch.arange(self.doc_ids.shape[1], device=device)
            return self._allowed(device, window)(at[:, None], at[None, :])[None, None]
        return self._cached(("bool", device, window), build)

    def block_mask(self, device, window: int | None = None):
        def build():
            from torch.nn.attention.flex_attention import create_block_mask

            allowed = self._allowed(device, window)
            L = self.doc_ids.shape[1]
            # Uncompiled, create_block_mask evaluates the dense L x L mask (GBs at 16k tokens).
            return create_block_mask(lambda b, h, q, kv: allowed(q, kv), 1, None, L, L, device=device,
                                     _compile=device.type == "cuda")
        return self._cached(("block", device, window), build)

    def choose(self, query: torch.Tensor, dropout: float, window: int | None = None, sinks: bool = False) -> str:
        causal_per_document = not self.branched and window is None and self.image_blocks is None and not sinks
        if self.backend == "flash":
            if not causal_per_document:
                raise ValueError("flash-attn varlen is causal per document: it cannot keep the prefix layout's "
                                 "rejected branch from seeing the chosen branch, nor express a sliding window "
                                 "counted within each pair, attention across an image or attention sinks")
            if _flash_varlen() is None:
                raise ValueError("attention backend 'flash' needs the flash-attn package")
        if self.backend != "auto":
            return self.backend
        if not query.is_cuda:
            return "sdpa"
        if causal_per_document and query.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
            return "flash"
        return "sdpa" if dropout > 0 else "flex"  # flex_attention has no dropout


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packing=None,
                     sliding_window=None, s_aux=None, **kwargs):
    """transformers' attention signature: q [1, H, L, d], k/v [1, H_kv, L, d] -> ([1, L, H, d], None).
    s_aux: attention sinks (GPT-OSS), a learned logit per head that joins every softmax's
    denominator and adds no value."""
    if not isinstance(packing, PackingInfo):
        raise ValueError(f"attention {ATTENTION!r} needs packing=PackingInfo(...) in the model call")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{ATTENTION!r} does not implement softcap attention")
    if query.shape[0] != 1:
        raise ValueError(f"{ATTENTION!r} takes one packed row (batch 1), got batch {query.shape[0]}")
    if s_aux is not None and packing.heads is not None and len(s_aux) == query.shape[1] * packing.heads[1]:
        # a learned logit per head: under Ulysses this rank attends one run of the heads, and takes their sinks
        # (its gradient reaches those alone; the group's sum covers each head once)
        part, parts = packing.heads
        s_aux = s_aux.chunk(parts)[part]
    if s_aux is not None and s_aux.shape != (query.shape[1],):
        raise ValueError(f"{ATTENTION!r}: {tuple(s_aux.shape)} attention sinks for {query.shape[1]} heads")
    dropout = dropout if module.training else 0.0
    backend = packing.choose(query, dropout, sliding_window, sinks=s_aux is not None)
    if backend == "flash":
        fn = _flash_varlen()
        cu = packing.cu_seqlens.to(query.device, torch.int32)
        out = fn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu,
                 packing.max_seqlen, packing.max_seqlen, dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out[None], None
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = _compiled_flex() if query.is_cuda else flex_attention
        out = flex(query, key, value, block_mask=packing.block_mask(query.device, sliding_window), scale=scaling,
                   enable_gqa=key.shape[1] != query.shape[1], return_lse=s_aux is not None)
        if s_aux is not None:  # softmax over [scores, sink] = softmax(scores) x e^lse / (e^lse + e^sink)
            out, lse = out
            out = out * torch.sigmoid(lse - s_aux.to(lse.dtype)[None, :, None])[..., None].to(out.dtype)
        return out.transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and (query.is_cuda or s_aux is not None):
        # With a mask, CUDA's SDPA takes GQA only in its math kernel (O(H L^2) memory); repeated
        # k/v keep the memory-efficient kernel eligible.
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    mask = packing.bool_mask(query.device, sliding_window)
    if s_aux is not None:
        out = _with_sinks(query, key, value, mask, scaling, dropout, s_aux)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _with_sinks(query, key, value, mask, scale, dropout, sinks) -> torch.Tensor:
    """Masked attention whose softmax also spans one sink logit per head (no value): [1, H, L, d].
    The whole [H, L, L] score matrix, as SDPA's math kernel holds it."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], -1), dim=-1)[..., :-1]
    return F.dropout(probs, dropout) @ value


def _no_mask(*args, **kwargs):
    return None  # the attention function builds its own from PackingInfo


@functools.cache
def register() -> str:
    """Add ATTENTION to transformers' registries (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)
    return ATTENTION
