"""Packed rows compute exactly each pair's own log-probs: plain and prefix layouts against every
pair run alone, unpadded, through the stock model (its own attention, its own position ids), on
tiny InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3 (a sliding window shorter than the pairs, images
attended both ways), Qwen2 and Llama models and the two mixtures of experts (InternVL on Qwen3-MoE,
Qwen3-VL-MoE: routing is per token, so packing changes none; InternVL on GPT-OSS: attention sinks and a
sliding window too) in fp32, with single-image,
multi-image and text-only pairs (rows of text-only pairs run the vision tower on a blank image).
The comparison is sharp enough to catch a one-position shift and any attention leak. The over-long
cut follows its rule at every budget."""

import dataclasses
import random

import pytest
import torch
from PIL import Image

import mpo
from mpo.data.formats import read_pairs
from mpo.data.packing import CHOSEN, IGNORE, REJECTED, SHARED, fit_to_budget, pack_row, pair_cost
from mpo.data.records import PreferencePair, Rejects
from mpo.data.render import RenderedPair, Renderer
from mpo.errors import BadPair
from mpo.families import family_of
from mpo.models.loading import lm_head, load_model, packed_hidden_states, pair_logps

VISION = ("internvl", "internvl_qwen3_moe", "internvl_gpt_oss", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
          "gemma3")
TOLERANCE = 1e-5  # relative, fp32 sums
TOKEN_TOLERANCE = 1e-4  # absolute, nats, fp32 token log-probs


def alone(model, pair, response_ids) -> torch.Tensor:
    """The response's token log-probs (float64) for [prompt | response] run by itself, stock
    attention and the model's own position ids and masks from what the family hands `generate`
    (Qwen-VL: get_rope_index from mm_token_type_ids; Gemma 3: bidirectional images from token_type_ids)."""
    ids = torch.tensor([pair.prompt_ids + response_ids[:-1]])
    kwargs = dict(input_ids=ids, use_cache=False, **family_of(model.config).generation_inputs(ids))
    if pair.pixel_values is not None:
        kwargs["pixel_values"] = pair.pixel_values
    if pair.image_grid_thw is not None:
        kwargs["image_grid_thw"] = pair.image_grid_thw
    logits = model(**kwargs).logits[0].double()
    P = len(pair.prompt_ids)
    scored = logits[P - 1:].log_softmax(-1)
    return scored.gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def sharpened(path, out):
    """A copy of the model whose query/key projections are large, so attention is peaked and
    every position and mask entry matters (random init gives near-uniform attention, which
    would hide a wrong position or a leaked token)."""
    from transformers import AutoConfig

    stock_cls = family_of(AutoConfig.from_pretrained(path)).auto_class()
    model = stock_cls.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "language_model" in name or "vision" not in name:
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.data = torch.randn(param.shape, generator=g) * 0.5
            if name.endswith("self_attn.sinks"):  # GPT-OSS: large enough to take much of each softmax
                param.data = torch.randn(param.shape, generator=g) * 2
            if "gemma" in model.config.model_type and name.endswith(("q_norm.weight", "k_norm.weight")):
                param.data.fill_(3.0)  # Gemma normalises q and k: their scale is (1 + this weight)
    model.save_pretrained(out)
    for f in path.iterdir():  # tokenizer and processor files
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    return out, stock_cls


def text_only(p: PreferencePair) -> PreferencePair:
    return dataclasses.replace(p, prompt=tuple({**m, "content": m["content"].replace("<image>\n", "")}
                                               for m in p.prompt), images=())


def two_images(p: PreferencePair, folder) -> PreferencePair:
    """p with a second image of another shape (so another tile count or patch grid) before it."""
    extra = folder / f"extra-{abs(hash(p.source))}.png"
    Image.open(p.images[0]).convert("RGB").resize((150, 48)).save(extra)
    prompt = ({**p.prompt[0], "content": "<image>\n" + p.prompt[0]["content"]},) + p.prompt[1:]
    return dataclasses.replace(p, prompt=prompt, images=(str(extra),) + p.images)


@pytest.fixture(scope="module", params=[*VISION, "qwen2", "llama"])
def setup(request, tiny_models, demo_data, tmp_path_factory):
    """(model, rendered pairs, expected sums, rows): for vision models rows of single-image pairs,
    of multi-image and text-only pairs mixed, and of text-only pairs alone; text models: text."""
    arch = request.param
    path, stock_cls = sharpened(tiny_models[arch], tmp_path_factory.mktemp(f"sharp-{arch}"))
    renderer = Renderer(path)
    pairs = list(read_pairs(demo_data / "meta_heldout.json", Rejects()))
    if arch in VISION:
        folder = tmp_path_factory.mktemp("images")
        pairs = (pairs[:5] + [two_images(p, folder) for p in pairs[5:7]] + [text_only(pairs[7])]
                 + [text_only(p) for p in pairs[8:]])
        groups = [range(5), range(5, 8), range(8, len(pairs))]
    else:
        pairs = [text_only(p) for p in pairs]
        groups = [range(5), range(5, len(pairs))]
    rendered = [renderer.render(p, i) for i, p in enumerate(pairs)]
    stock = stock_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = [(alone(stock, p, p.chosen_ids), alone(stock, p, p.rejected_ids)) for p in rendered]
    return load_model(path).eval(), rendered, expected, [[rendered[i] for i in g] for g in groups], stock


def errors(model, row, batch, expected, backend="sdpa") -> tuple[float, float]:
    """(largest relative error of the row's per-pair sums, largest absolute error of a response
    token's log-prob) against each pair run alone. Sums are what the loss reads; single tokens are
    where a small fault shows before a sum of a hundred tokens dilutes it."""
    with torch.no_grad():
        sums, counts = pair_logps(model, batch, backend=backend, impl="torch")
        hidden = packed_hidden_states(model, batch, backend=backend)
        tokens = mpo.linear_logprobs(hidden, lm_head(model).weight, batch.labels[0], impl="torch")
    seq = batch.seq_ids[0]
    worst_sum = worst_token = 0.0
    for k, p in enumerate(row):
        assert counts[2 * k] == len(p.chosen_ids) and counts[2 * k + 1] == len(p.rejected_ids)
        for s in (2 * k, 2 * k + 1):
            want = expected[p.index][s % 2]
            worst_sum = max(worst_sum, abs(sums[s].item() - want.sum().item()) / abs(want.sum().item()))
            worst_token = max(worst_token, (tokens[seq == s].double() - want).abs().max().item())
    return worst_sum, worst_token


@pytest.mark.parametrize("layout, backend", [("prefix", "sdpa"), ("plain", "sdpa"), ("none", "sdpa"),
                                             ("prefix", "flex"), ("plain", "flex")])
def test_packed_rows_equal_each_pair_alone(setup, layout, backend):
    model, rendered, expected, rows, _ = setup
    positions = family_of(model.config).positions
    rows = rows if layout != "none" else [[p] for p in rendered]
    for row in rows:
        batch = pack_row(row, layout, positions)
        assert batch.num_tokens == sum(pair_cost(p, layout) for p in row)
        sums, tokens = errors(model, row, batch, expected, backend)
        assert sums < TOLERANCE and tokens < TOKEN_TOLERANCE, (layout, [p.source for p in row])


def test_the_comparison_catches_a_shift_and_every_leak(setup):
    """Each fault the packing must not have, injected into a correct prefix row, breaks the
    equality far beyond its tolerance: the rejected branch's positions one later, one chosen token
    visible to the rejected branch, two documents that see each other."""
    model, _, _, rows, stock = setup
    # another question's answer as the rejected response: the two part after a few tokens, so a
    # leaked chosen token is seen by most of the rejected branch
    row = [dataclasses.replace(p, rejected_ids=q.chosen_ids, index=k) for k, (p, q) in
           enumerate(zip(rows[0][:3], rows[0][1:4]))]
    with torch.no_grad():
        expected = [(alone(stock, p, p.chosen_ids), alone(stock, p, p.rejected_ids)) for p in row]
    batch = pack_row(row, "prefix", family_of(model.config).positions)
    sums, tokens = errors(model, row, batch, expected)
    assert sums < TOLERANCE and tokens < TOKEN_TOLERANCE
    rejected = batch.branch_ids == REJECTED
    shifted = batch.position_ids.clone()
    shifted[..., rejected[0]] += 1
    # the first chosen token that differs from the rejected one becomes visible to the rejected branch
    first = row[0]
    j = next(j for j, (c, r) in enumerate(zip(first.chosen_ids, first.rejected_ids)) if c != r)
    leaked_branch = batch.branch_ids.clone()
    leaked_branch[0, (batch.branch_ids[0] == CHOSEN).nonzero()[1 + j]] = SHARED
    one_document = batch.doc_ids.clone()
    one_document[one_document == 1] = 0
    faults = {"shift": dataclasses.replace(batch, position_ids=shifted),
              "chosen leak": dataclasses.replace(batch, branch_ids=leaked_branch),
              "cross-document leak": dataclasses.replace(batch, doc_ids=one_document)}
    for name, broken in faults.items():
        _, tokens = errors(model, row, broken, expected)
        assert tokens > 10 * TOKEN_TOLERANCE, name  # far outside what the equality test allows


def test_prefix_layout_structure(setup):
    """Labels sit only on response positions, the rejected branch takes the positions of prompt +
    rejected alone from the prompt's last token on, each image is encoded once per pair in prefix
    and twice in plain."""
    model, rendered, _, _, _ = setup
    positions = family_of(model.config).positions
    p = rendered[0]
    prefix, plain = pack_row([p], "prefix", positions), pack_row([p], "plain", positions)
    P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
    assert prefix.num_tokens == P + C + R - 1 and plain.num_tokens == 2 * P + C + R - 2
    rows = prefix.position_ids.reshape(-1, prefix.num_tokens)
    alone_rejected = positions(p.prompt_ids + p.rejected_ids[:-1], p.image_grid_thw)
    assert torch.equal(rows[:, P - 1 + C:], alone_rejected[:, P - 1:])  # the rejected branch restarts
    assert rows[0, P - 1 + C].item() == rows[0, P - 1].item()
    labels, seq = prefix.labels[0], prefix.seq_ids[0]
    assert ((labels != IGNORE) == (seq >= 0)).all()
    assert labels[seq == 0].tolist() == p.chosen_ids and labels[seq == 1].tolist() == p.rejected_ids
    assert prefix.cu_seqlens.tolist() == [0, prefix.num_tokens]
    assert plain.cu_seqlens.tolist() == [0, P + C - 1, plain.num_tokens]
    if p.pixel_values is not None:
        assert prefix.pixel_values.shape[0] == p.tiles and plain.pixel_values.shape[0] == 2 * p.tiles


def cut_by_rule(P: int, chosen: list, rejected: list, layout: str, budget: int):
    """What the over-long policy must do, one token at a time: cut the longer response (rejected on
    a tie) until the pair fits; a pair whose responses cannot both keep a token is too long, one
    whose cut responses are equal or one the start of the other has nothing to prefer."""
    C, R = len(chosen), len(rejected)
    cost = lambda: P + C + R - 1 if layout == "prefix" else 2 * P + C + R - 2
    if cost() <= budget:
        return C, R
    while cost() > budget:
        if C == R == 1:
            return "too_long"
        if C > R:
            C -= 1
        else:
            R -= 1
    shorter = min(C, R)
    return "identical_responses" if chosen[:shorter] == rejected[:shorter] else (C, R)


def outcome(pair, layout: str, budget: int):
    try:
        cut = fit_to_budget(pair, layout, budget, "truncate")
    except BadPair as bad:
        return bad.reason
    assert cut.prompt_ids == pair.prompt_ids
    assert cut.chosen_ids == pair.chosen_ids[:len(cut.chosen_ids)]
    assert cut.rejected_ids == pair.rejected_ids[:len(cut.rejected_ids)]
    return len(cut.chosen_ids), len(cut.rejected_ids)


def token_pair(rng, prompt: int, chosen: list, rejected: list) -> RenderedPair:
    return RenderedPair([rng.randrange(1, 50_000) for _ in range(prompt)], chosen, rejected, None)


@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_a_cut_that_leaves_rejected_the_start_of_chosen_is_rejected(random_seed, layout):
    rng = random.Random(random_seed)
    rejected = [rng.randrange(1, 50_000) for _ in range(rng.randrange(5, 200))]
    pair = token_pair(rng, rng.randrange(1, 60), rejected + [rng.randrange(1, 50_000)], rejected)
    fits = pair_cost(pair, layout)
    assert outcome(pair, layout, fits) == (len(rejected) + 1, len(rejected))
    assert outcome(pair, layout, fits - 1) == "identical_responses"  # cut to equal
    with pytest.raises(BadPair, match="rejected the start of the other"):  # an odd room: chosen keeps one more
        fit_to_budget(pair, layout, fits - 2, "truncate")


@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_the_overlong_cut_follows_its_rule_at_every_budget(random_seed, layout):
    rng = random.Random(random_seed)
    token = lambda: rng.randrange(1, 6)  # few distinct ids: responses often share their start
    for _ in range(60):
        shared = [token() for _ in range(rng.randrange(0, 12))]
        chosen = shared + [token() for _ in range(rng.randrange(0, 6))]
        rejected = shared + [token() for _ in range(rng.randrange(0, 6))]
        if not chosen or not rejected or chosen == rejected:
            continue
        pair = token_pair(rng, rng.randrange(1, 5), chosen, rejected)
        for budget in range(1, pair_cost(pair, layout) + 2):
            where = (random_seed, chosen, rejected, len(pair.prompt_ids), budget)
            assert outcome(pair, layout, budget) == cut_by_rule(len(pair.prompt_ids), chosen, rejected, layout,
                                                                budget), where
