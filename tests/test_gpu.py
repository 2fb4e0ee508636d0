"""GPU tier (`pytest -m gpu`): compiled kernels at model-sized vocabularies, bf16, N*V > 2^31.

The CPU-tier tests also run on the GPU when one is present (compiled instead of interpreted);
these add the shapes only a GPU can hold. References are fp32 over vocabulary chunks on the
16-bit inputs (their error is ~1e-6 relative, far below the 16-bit effects being checked).
"""

import pytest
import torch
from helpers import IGNORE, assert_accurate, random_head

import mpo

pytestmark = pytest.mark.gpu


def chunked_reference(head, *, chunk=8192, upstream=None):
    """fp32 log-probs (and, with `upstream`, fp32 grads) without materialising [N, V]."""
    h = head.hidden.detach().float().requires_grad_(upstream is not None)
    w = head.weight.detach().float().requires_grad_(upstream is not None)
    valid = head.targets != IGNORE
    t = head.targets.clamp(min=0)
    with torch.set_grad_enabled(upstream is not None):
        lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
        for lo in range(0, w.shape[0], chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(h @ w[lo:lo + chunk].t(), dim=1))
        lp = torch.where(valid, (h * w[t]).sum(1) - lse, torch.zeros_like(lse))
        if upstream is None:
            return lp, None
        (lp * upstream).sum().backward()
    return lp.detach(), (h.grad, w.grad)


@pytest.mark.parametrize("D, V", [(4096, 92553), (3584, 152064)])
def test_model_vocabularies_bf16(D, V):
    head = random_head(4096, D, V, torch.bfloat16, "cuda", seed=0)
    up = torch.randn(4096, device="cuda")
    ref, (rh, rw) = chunked_reference(head, upstream=up)
    out = mpo.linear_logprobs(head.hidden, head.weight, head.targets)
    (out * up).sum().backward()
    # in-dtype baseline: bf16 logits (the eager recipe), fp32 softmax
    h, w = head.hidden.detach().requires_grad_(), head.weight.detach().requires_grad_()
    base = (h @ w.t()).float().log_softmax(-1).gather(1, head.targets.clamp(min=0)[:, None]).squeeze(1)
    base = torch.where(head.targets != IGNORE, base, torch.zeros_like(base))
    (base * up).sum().backward()
    assert_accurate("logp", out, base.detach(), ref, torch.bfloat16)
    assert_accurate("dH", head.hidden.grad, h.grad, rh, torch.bfloat16)
    assert_accurate("dW", head.weight.grad, w.grad, rw, torch.bfloat16)


def test_rows_times_vocab_beyond_int32():
    """N * V = 2.5e9 > 2^31 logits (none stored): the chunking and the per-row scatter must hold up
    at this size. Forward and gradients vs the reference."""
    N, D, V = 16384, 128, 152064
    head = random_head(N, D, V, torch.bfloat16, "cuda", seed=1, ignore_frac=0.0)
    up = torch.randn(N, device="cuda")
    ref, (rh, rw) = chunked_reference(head, upstream=up)
    out = mpo.linear_logprobs(head.hidden, head.weight, head.targets)
    (out * up).sum().backward()
    assert (out - ref).abs().max().item() < 2e-3
    tail = slice(N - 64, N)  # the rows whose offsets overflow int32 first
    assert torch.allclose(out[tail], ref[tail], atol=2e-3, rtol=0)
    assert (head.hidden.grad.float() - rh).abs().max().item() <= 2e-2 * rh.abs().max().item()
    assert (head.weight.grad.float() - rw).abs().max().item() <= 2e-2 * rw.abs().max().item()


def test_weight_offsets_beyond_int32():
    """V * D = 2.2e9 > 2^31 elements: W row offsets (and dW's) must be computed in 64 bits."""
    N, D, V = 256, 14336, 152064
    head = random_head(N, D, V, torch.bfloat16, "cuda", seed=4, ignore_frac=0.0)
    head.targets[: N // 2] = V - 1 - torch.arange(N // 2, device="cuda")  # rows near the end of W
    up = torch.randn(N, device="cuda")
    ref, (rh, rw) = chunked_reference(head, upstream=up)
    out = mpo.linear_logprobs(head.hidden, head.weight, head.targets)
    (out * up).sum().backward()
    assert (out - ref).abs().max().item() < 2e-3
    assert (head.hidden.grad.float() - rh).abs().max().item() <= 2e-2 * rh.abs().max().item()
    tail = slice(V - N, V)
    assert (head.weight.grad[tail].float() - rw[tail]).abs().max().item() <= 2e-2 * rw[tail].abs().max().item()


def test_compiled_determinism_bf16():
    head = random_head(8192, 4096, 32000, torch.bfloat16, "cuda", seed=2, bias=True)
    seq = torch.arange(8192, device="cuda") // 300
    runs = []
    for _ in range(2):
        for x in head.leaves():
            x.grad = None
        sums, _ = mpo.linear_sequence_logps(head.hidden, head.weight, head.targets, seq, int(seq.max()) + 1,
                                            head.bias, softcap=30.0)
        (sums * torch.linspace(-1, 1, sums.numel(), device="cuda")).sum().backward()
        runs.append([sums.detach()] + [x.grad.clone() for x in head.leaves()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_mpo_loss_bf16_matches_torch_path():
    g = torch.Generator(device="cuda").manual_seed(3)
    P, T, D, V = 16, 200, 2048, 50000
    hidden = torch.randn(2 * P * T, D, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, D, device="cuda", generator=g) / D**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (2 * P * T,), device="cuda", generator=g)
    seq = torch.arange(2 * P, device="cuda").repeat_interleave(T)
    ref = -torch.rand(2 * P, device="cuda", generator=g) * 2000
    out = {}
    for impl in ("triton", "torch"):
        hidden.grad = weight.grad = None
        loss, m = mpo.MPOLoss(impl=impl)(hidden, weight, targets, seq, ref[0::2], ref[1::2])
        loss.backward()
        out[impl] = (loss.item(), hidden.grad.float(), weight.grad.float(), m["rewards/margins"].item())
    a, b = out["triton"], out["torch"]
    assert a[0] == pytest.approx(b[0], rel=1e-2)
    assert a[3] == pytest.approx(b[3], rel=5e-2, abs=5e-2)
    for x, y in zip(a[1:3], b[1:3]):
        assert (x - y).abs().max().item() <= 5e-2 * y.abs().max().item()


@pytest.mark.parametrize("backend", ["flex", "sdpa", "flash"])
@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_packed_attention_backends_forward_and_backward(layout, backend):
    """Compiled FlexAttention, masked SDPA and flash-attn varlen on CUDA, bf16, against a dense
    fp32 reference, outputs and gradients, on rows of many 128-token blocks."""
    from mpo.data.packing import pack_row
    from mpo.data.render import RenderedPair
    from mpo.models.packed_attention import PackingInfo, _flash_varlen, packed_attention

    if backend == "flash" and (layout == "prefix" or _flash_varlen() is None):
        pytest.skip("flash-attn varlen: plain layout, when installed")
    pairs = [RenderedPair(list(range(1, 300)), list(range(200)), list(range(150)), None, index=i) for i in range(3)]
    batch = pack_row(pairs, layout)
    L = batch.num_tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(1, h, L, 64, device="cuda", generator=g).bfloat16().requires_grad_() for h in (8, 2, 2)]

    class Layer(torch.nn.Module):
        pass

    out = packed_attention(Layer(), *leaves, None, scaling=0.125, packing=PackingInfo.of(batch, backend))[0]
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), leaves)
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    doc, br = batch.doc_ids[0].cuda(), batch.branch_ids[0].cuda()
    idx = torch.arange(L, device="cuda")
    allowed = ((doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
               & ~((br[:, None] == 2) & (br[None, :] == 1)))
    qf, kf, vf = ref_leaves
    s = (qf @ kf.repeat_interleave(4, 1).transpose(-1, -2)) * 0.125
    ref = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vf.repeat_interleave(4, 1)).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * up.float()).sum(), ref_leaves)
    assert (out.float() - ref).abs().max().item() < 2e-2
    for a, b in zip(grads, ref_grads):
        assert (a.float() - b).abs().max().item() <= 2e-2 * b.abs().max().item() + 1e-3


@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_flex_attention_with_sinks_window_and_image_blocks_backward(layout):
    """Compiled FlexAttention's sink rescaling (through its log-sum-exp) with a sliding window and
    image blocks: values and gradients, the sinks' included, equal the SDPA path's explicit softmax
    (checked against the definition on the CPU), fp32."""
    from mpo.data.packing import pack_row
    from mpo.data.render import RenderedPair
    from mpo.models.packed_attention import PackingInfo, packed_attention

    image = [7] * 64
    pairs = [RenderedPair([1] + image + list(range(8, 200)), list(range(200)), list(range(150)), None, index=i)
             for i in range(3)]
    batch = pack_row(pairs, layout).to("cuda")
    L = batch.num_tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(1, h, L, 64, device="cuda", generator=g).requires_grad_() for h in (8, 2, 2)]
    leaves.append((torch.randn(8, device="cuda", generator=g) * 2).requires_grad_())

    class Layer(torch.nn.Module):
        pass

    outs = {}
    for backend in ("flex", "sdpa"):
        out = packed_attention(Layer(), *leaves[:3], None, scaling=0.125, sliding_window=100, s_aux=leaves[3],
                               packing=PackingInfo.of(batch, backend, image_token=7))[0]
        outs[backend] = (out, torch.autograd.grad(out.square().sum(), leaves))
    (a, da), (b, db) = outs["flex"], outs["sdpa"]
    assert (a - b).abs().max().item() < 1e-4
    for x, y in zip(da, db):
        assert (x - y).abs().max().item() <= 1e-3 * y.abs().max().item()
