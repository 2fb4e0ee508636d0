"""Packed rows compute exactly each pair's own log-probs: plain and prefix layouts against every
pair run alone, unpadded, through the stock model (its own attention), on tiny InternVL, Qwen2
and Llama models in fp32."""

import pytest
import torch

from mpo.data.formats import read_pairs
from mpo.data.packing import IGNORE, pack_row, pair_cost
from mpo.data.records import Rejects
from mpo.data.render import Renderer
from mpo.models.loading import is_vision_language, load_model, pair_logps


def alone(model, pair, response_ids):
    """Sum of the response's log-probs for [prompt | response] run by itself, stock attention."""
    ids = torch.tensor([pair.prompt_ids + response_ids[:-1]])
    kwargs = dict(input_ids=ids, use_cache=False)
    if pair.pixel_values is not None:
        kwargs["pixel_values"] = pair.pixel_values
    logits = model(**kwargs).logits[0].double()
    P = len(pair.prompt_ids)
    scored = logits[P - 1:].log_softmax(-1)
    return scored.gather(1, torch.tensor(response_ids)[:, None]).sum().item()


def sharpened(path, out):
    """A copy of the model whose query/key projections are large, so attention is peaked and
    every position and mask entry matters (random init gives near-uniform attention, which
    would hide a wrong position or a leaked token)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    stock_cls = AutoModelForImageTextToText if is_vision_language(AutoConfig.from_pretrained(path)) \
        else AutoModelForCausalLM
    model = stock_cls.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "language_model" in name or "vision" not in name:
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.data = torch.randn(param.shape, generator=g) * 0.5
    model.save_pretrained(out)
    for f in path.iterdir():  # tokenizer and processor files
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    return out, stock_cls


@pytest.fixture(scope="module", params=["internvl", "qwen2", "llama"])
def setup(request, tiny_models, demo_data, tmp_path_factory):
    arch = request.param
    path, stock_cls = sharpened(tiny_models[arch], tmp_path_factory.mktemp(f"sharp-{arch}"))
    renderer = Renderer(path)
    pairs = list(read_pairs(demo_data / "meta_heldout.json", Rejects()))
    if arch != "internvl":  # text-only: the same questions without their images
        pairs = [type(p)(tuple({**m, "content": m["content"].replace("<image>\n", "")} for m in p.prompt),
                         p.chosen, p.rejected, (), p.source) for p in pairs]
    rendered = [renderer.render(p, i) for i, p in enumerate(pairs)]
    stock = stock_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        expected = [(alone(stock, p, p.chosen_ids), alone(stock, p, p.rejected_ids)) for p in rendered]
    return load_model(path).eval(), rendered, expected


@pytest.mark.parametrize("layout, backend", [("prefix", "sdpa"), ("plain", "sdpa"), ("none", "sdpa"),
                                             ("prefix", "flex"), ("plain", "flex")])
def test_packed_rows_equal_each_pair_alone(setup, layout, backend):
    model, rendered, expected = setup
    rows = [rendered[:5], rendered[5:]] if layout != "none" else [[p] for p in rendered]
    for row in rows:
        batch = pack_row(row, layout)
        assert batch.num_tokens == sum(pair_cost(p, layout) for p in row)
        with torch.no_grad():
            sums, counts = pair_logps(model, batch, backend=backend, impl="torch")
        for k, p in enumerate(row):
            assert counts[2 * k] == len(p.chosen_ids) and counts[2 * k + 1] == len(p.rejected_ids)
            for got, want in ((sums[2 * k], expected[p.index][0]), (sums[2 * k + 1], expected[p.index][1])):
                assert got.item() == pytest.approx(want, rel=1e-5), (layout, p.source)


def test_prefix_layout_structure(setup):
    """Labels sit only on response positions, rejected positions restart at len(prompt) - 1, each
    image is encoded once per pair in prefix and twice in plain."""
    _, rendered, _ = setup
    p = rendered[0]
    prefix, plain = pack_row([p], "prefix"), pack_row([p], "plain")
    P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
    assert prefix.num_tokens == P + C + R - 1 and plain.num_tokens == 2 * P + C + R - 2
    assert prefix.position_ids[0, P - 1 + C].item() == P - 1  # rejected branch restarts
    labels, seq = prefix.labels[0], prefix.seq_ids[0]
    assert ((labels != IGNORE) == (seq >= 0)).all()
    assert labels[seq == 0].tolist() == p.chosen_ids and labels[seq == 1].tolist() == p.rejected_ids
    assert prefix.cu_seqlens.tolist() == [0, prefix.num_tokens]
    assert plain.cu_seqlens.tolist() == [0, P + C - 1, plain.num_tokens]
    if p.pixel_values is not None:
        assert prefix.pixel_values.shape[0] == p.tiles and plain.pixel_values.shape[0] == 2 * p.tiles
