"""The packed attention function: backends agree with a dense reference written from the definition
(with sliding windows counted in each pair's own sequence, bidirectional image blocks and attention
sinks, in values and gradients), selection, and clear errors."""

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


def own_index(batch) -> list[int]:
    """Each token's index in its pair's own sequence: the tokens before it in its document that are
    the prompt's or its own branch's (a rejected token does not count the chosen branch)."""
    doc, branch = batch.doc_ids[0].tolist(), batch.branch_ids[0].tolist()
    return [sum(1 for dd, bb in zip(doc[:t], branch[:t]) if dd == d and bb in (0, b))
            for t, (d, b) in enumerate(zip(doc, branch))]


def dense_reference(batch, q, k, v, scale, window=None, blocks=None, sinks=None):
    """From the definition: same document, causal, rejected never sees chosen; or within one image
    block both ways; within `window` of each pair's own positions; sinks join each softmax."""
    doc, br = batch.doc_ids[0], batch.branch_ids[0]
    idx = torch.arange(doc.numel())
    allowed = (idx[None, :] <= idx[:, None]) & ~((br[:, None] == 2) & (br[None, :] == 1))
    if blocks is not None:
        allowed |= (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
    if window is not None:
        own = torch.tensor(own_index(batch))
        allowed &= own[:, None] - own[None, :] < window
    allowed &= doc[:, None] == doc[None, :]
    groups = q.shape[1] // k.shape[1]
    scores = ((q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[None, :, None, None].expand(*scores.shape[:-1], 1)], -1)
    probs = scores.softmax(-1)[..., :allowed.shape[1]]
    return (probs @ v.repeat_interleave(groups, 1)).transpose(1, 2)


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


@pytest.mark.parametrize("window, images, sinks", [(3, False, False), (None, True, False), (None, False, True),
                                                   (5, True, True)])
@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_windows_image_blocks_and_sinks_match_the_definition_with_gradients(layout, window, images, sinks,
                                                                            random_seed):
    """Token 7 marks images: two runs of it in the first prompt (two images), one in the second."""
    pairs = [RenderedPair([1, 7, 7, 7, 2, 7, 7, 3, 4], [5, 6, 8, 9, 5, 6], [8, 9, 10, 11], None, index=0),
             RenderedPair([1, 7, 7, 2], [5, 6, 8, 5, 6, 9, 9], [9, 10, 11, 12, 13], None, index=1)]
    batch = pack_row(pairs, layout)
    L = batch.num_tokens
    g = torch.Generator().manual_seed(random_seed)
    q, k, v = (torch.randn(1, 4, L, 8, generator=g, dtype=torch.float64).requires_grad_(),
               torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64).requires_grad_(),
               torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64).requires_grad_())
    aux = (torch.randn(4, generator=g, dtype=torch.float64) * 2).requires_grad_() if sinks else None
    ids = batch.input_ids[0]
    image = ids == 7
    blocks = torch.where(image, (image & ~torch.nn.functional.pad(image, (1, 0))[:-1]).cumsum(0) - 1, -1)
    ref = dense_reference(batch, q, k, v, 0.3, window, blocks if images else None, aux)
    inputs = [q, k, v] + ([aux] if sinks else [])
    info = PackingInfo.of(batch, "sdpa", 7 if images else None)
    out = packed_attention(Layer(), q, k, v, None, scaling=0.3, packing=info, sliding_window=window, s_aux=aux)[0]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9, msg=f"seed {random_seed}")
    for a, b in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"seed {random_seed}")
    # FlexAttention has no backward on the CPU: its values here, its gradients in the gpu tier
    info = PackingInfo.of(batch, "flex", 7 if images else None)
    detached = [x.detach() for x in (q, k, v)] + [aux.detach() if sinks else None]
    with torch.no_grad():
        out = packed_attention(Layer(), *detached[:3], None, scaling=0.3, packing=info, sliding_window=window,
                               s_aux=detached[3])[0]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-9, msg=f"flex seed {random_seed}")


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
    with pytest.raises(NotImplementedError, match="softcap"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["plain"]), softcap=50.0)
    with pytest.raises(ValueError, match="cannot keep the prefix"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["prefix"], "flash"))
    plain = rows()["plain"]
    for extra, info in ((dict(sliding_window=4), PackingInfo.of(plain, "flash")),
                        (dict(s_aux=torch.zeros(1)), PackingInfo.of(plain, "flash")),
                        ({}, PackingInfo.of(plain, "flash", image_token=1))):
        with pytest.raises(ValueError, match="sliding window counted within each pair, attention across an image"):
            packed_attention(Layer(), q, q, q, None, packing=info, **extra)


def test_forced_flash_without_flash_attn(monkeypatch):
    from mpo.models import packed_attention as pa

    monkeypatch.setattr(pa, "_flash_varlen", lambda: None)
    q = torch.zeros(1, 1, 3, 8)
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        packed_attention(Layer(), q, q, q, None, packing=PackingInfo.of(rows()["plain"], "flash"))
