"""Attention over packed rows for HF models, through transformers' attention registries.

`register()` adds ATTENTION ("mpo_packed") to transformers' AttentionInterface, with a mask
function that returns None so transformers builds no causal mask of its own; the model is then
switched to it with `set_attn_implementation` (the language model only, for vision-language
models) and every forward passes `packing=PackingInfo(...)`, which transformers hands through
to the attention function unchanged. No model code is copied or patched.

Token j may attend to token k when both are in the same document, k <= j, and not (j is in the
rejected branch and k in the chosen branch) - exactly each pair's own computation. Backends:
- flash-attn varlen (`flash_attn_varlen_func`, causal per document): plain layout only, CUDA,
  16-bit, when flash-attn is installed;
- FlexAttention with a block mask from the document and branch ids (either layout, CUDA; also
  runs, uncompiled, on CPU for tests);
- SDPA with an explicit boolean [L, L] mask (CPU and tests; memory grows with L^2).
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
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, batch: PackedBatch, backend: str = "auto") -> PackingInfo:
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        bounds = batch.cu_seqlens.cpu()
        return cls(batch.doc_ids, batch.branch_ids, batch.cu_seqlens, int((bounds[1:] - bounds[:-1]).max()),
                   batch.layout == "prefix", backend)

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def bool_mask(self, device) -> torch.Tensor:
        """[1, 1, L, L]: True where attention is allowed (built once per row, shared by all layers)."""
        def build():
            doc, branch = self.doc_ids[0].to(device), self.branch_ids[0].to(device)
            idx = torch.arange(doc.numel(), device=device)
            allowed = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
            allowed &= ~((branch[:, None] == REJECTED) & (branch[None, :] == CHOSEN))
            return allowed[None, None]
        return self._cached(("bool", device), build)

    def block_mask(self, device):
        def build():
            from torch.nn.attention.flex_attention import create_block_mask

            doc, branch = self.doc_ids[0].to(device), self.branch_ids[0].to(device)

            def mask_mod(b, h, q, kv):
                return (doc[q] == doc[kv]) & (kv <= q) & ~((branch[q] == REJECTED) & (branch[kv] == CHOSEN))

            L = doc.numel()
            # Uncompiled, create_block_mask evaluates the dense L x L mask (GBs at 16k tokens).
            return create_block_mask(mask_mod, 1, None, L, L, device=device, _compile=device.type == "cuda")
        return self._cached(("block", device), build)

    def choose(self, query: torch.Tensor, dropout: float) -> str:
        if self.backend == "flash":
            if self.branched:
                raise ValueError("flash-attn varlen is causal per document: it cannot keep the prefix "
                                 "layout's rejected branch from seeing the chosen branch")
            if _flash_varlen() is None:
                raise ValueError("attention backend 'flash' needs the flash-attn package")
        if self.backend != "auto":
            return self.backend
        if not query.is_cuda:
            return "sdpa"
        if not self.branched and query.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
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
                     sliding_window=None, **kwargs):
    """transformers' attention signature: q [1, H, L, d], k/v [1, H_kv, L, d] -> ([1, L, H, d], None)."""
    if not isinstance(packing, PackingInfo):
        raise ValueError(f"attention {ATTENTION!r} needs packing=PackingInfo(...) in the model call")
    unsupported = [name for name, value in (("sliding_window", sliding_window), ("softcap", kwargs.get("softcap")),
                                            ("s_aux", kwargs.get("s_aux"))) if value is not None]
    if unsupported:
        raise NotImplementedError(f"{ATTENTION!r} does not implement {', '.join(unsupported)} attention")
    if query.shape[0] != 1:
        raise ValueError(f"{ATTENTION!r} takes one packed row (batch 1), got batch {query.shape[0]}")
    dropout = dropout if module.training else 0.0
    backend = packing.choose(query, dropout)
    if backend == "flash":
        fn = _flash_varlen()
        cu = packing.cu_seqlens.to(query.device, torch.int32)
        out = fn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu,
                 packing.max_seqlen, packing.max_seqlen, dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out[None], None
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = _compiled_flex() if query.is_cuda else flex_attention
        out = flex(query, key, value, block_mask=packing.block_mask(query.device), scale=scaling,
                   enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and query.is_cuda:
        # With a mask, CUDA's SDPA takes GQA only in its math kernel (O(H L^2) memory); repeated
        # k/v keep the memory-efficient kernel eligible.
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=packing.bool_mask(query.device),
                                         dropout_p=dropout, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


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
