"""The packed attention function: backends agree, selection, and clear errors."""

import pytest
import torch

from mpo.data.packing import pack_row
from mpo.data.render import RenderedPair
from mpo.models.packed_attention import PackingInfo, packed_attention


class Layer(torch.nn.Module):
    pass


def rows(scale=1):
    """Two pairs; scale 40 makes rows of several hundred tokens (block masks of many 128-blocks)."""
    pairs = [RenderedPair([1, 2, 3, 4] * scale, [5, 6, 7] * scale, [8, 9] * scale, None, index=0),
             RenderedPair([1, 2] * scale, [5, 6, 7, 8] * scale, [9, 10, 11] * scale, None, index=1)]
    return {layout: pack_row(pairs, layout) for layout in ("prefix", "plain")}


def dense_reference(batch, q, k, v, scale):
    """From the definition: same document, causal, rejected never sees chosen."""
    doc, br = batch.doc_ids[0], batch.branch_ids[0]
    idx = torch.arange(doc.numel())
    allowed = ((doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
               & ~((br[:, None] == 2) & (br[None, :] == 1)))
    groups = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * scale
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(groups, 1)).transpose(1, 2)


@pytest.mark.parametrize("scale", [1, 40])
@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_flex_equals_sdpa_mask_and_both_match_a_dense_reference(layout, scale):
    batch = rows(scale)[layout]
    L = batch.num_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g),
               torch.randn(1, 2, L, 8, generator=g))
    outs = {b: packed_attention(Layer(), q, k, v, None, scaling=0.3, packing=PackingInfo.of(batch, b))[0]
            for b in ("sdpa", "flex")}
    ref = dense_reference(batch, q, k, v, 0.3)
    assert outs["sdpa"].shape == (1, L, 4, 8)
    for out in outs.values():
        assert torch.allclose(out, ref, atol=1e-5)


def test_backend_choice():
    batch = rows()["plain"]
    q = torch.zeros(1, 1, 2, 8)
    assert PackingInfo.of(batch).choose(q, 0.0) == "sdpa"  # CPU
    assert PackingInfo.of(batch, "flex").choose(q, 0.0) == "flex"
    with pytest.raises(ValueError, match="backend"):
        PackingInfo.of(batch, "xformers")


def test_errors_name_the_problem():
    q = torch.zeros(1, 1, 3, 8)
    with pytest.raises(ValueError, match="packing=PackingInfo"):
        packed_attention(Layer(), q, q, q, None)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["plain"]), sliding_window=4)
    with pytest.raises(NotImplementedError, match="softcap"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["plain"]), softcap=50.0)
    with pytest.raises(ValueError, match="cannot keep the prefix"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["prefix"], "flash"))


def test_forced_flash_without_flash_attn(monkeypatch):
    from mpo.models import packed_attention as pa

    monkeypatch.setattr(pa, "_flash_varlen", lambda: None)
    q = torch.zeros(1, 1, 3, 8)
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["plain"], "flash"))
