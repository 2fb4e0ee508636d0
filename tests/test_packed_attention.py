"""The packed attention function: backends agree, selection, and clear errors."""

import pytest
import torch

from mpo.data.packing import pack_row
from mpo.data.render import RenderedPair
from mpo.models.packed_attention import PackingInfo, packed_attention


class Layer(torch.nn.Module):
    pass


def rows():
    pairs = [RenderedPair([1, 2, 3, 4], [5, 6, 7], [8, 9], None, index=0),
             RenderedPair([1, 2], [5, 6, 7, 8], [9, 10, 11], None, index=1)]
    return {layout: pack_row(pairs, layout) for layout in ("prefix", "plain")}


@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_flex_equals_sdpa_mask_and_both_match_a_dense_reference(layout):
    batch = rows()[layout]
    L = batch.num_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g), torch.randn(1, 2, L, 8, generator=g)
    outs = {b: packed_attention(Layer(), q, k, v, None, scaling=0.3, packing=PackingInfo.of(batch, b))[0]
            for b in ("sdpa", "flex")}
    # dense reference from the definition: same document, causal, rejected never sees chosen
    doc, br = batch.doc_ids[0], batch.branch_ids[0]
    allowed = torch.tensor([[doc[i] == doc[j] and j <= i and not (br[i] == 2 and br[j] == 1) for j in range(L)]
                            for i in range(L)])
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    ref = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
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
    with pytest.raises(NotImplementedError, match="sliding-window"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["plain"]), sliding_window=4)
