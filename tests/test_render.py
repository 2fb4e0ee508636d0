"""Rendering through the model folder's tokenizer, chat template and image processor, and the
render-stage bad-input reasons (unreadable images, text-only models, over-long pairs)."""

import json

import pytest
import torch
from PIL import Image

from mpo.data.dataset import PairDataset
from mpo.data.packing import PackingOptions, fit_to_budget, pair_cost
from mpo.data.records import PreferencePair, Rejects
from mpo.data.render import ImageOptions, Renderer
from mpo.errors import BadPair, DataError
from mpo.models.tiny import IMAGE_SEQ_LENGTH


def make_pair(images=(), question="<image>\nWhat colour?", chosen="Red.", rejected="Blue.", **kw):
    content = question if images else question.replace("<image>\n", "")
    return PreferencePair(({"role": "user", "content": content},), chosen, rejected, tuple(images), "t:1", **kw)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.new("RGB", (160, 96), "red").save(path)
    return path


def test_internvl_prompt_image_tokens_and_responses(tiny_models, image_file):
    r = Renderer(tiny_models["internvl"])
    tok = r.tokenizer
    rp = r.render(make_pair([str(image_file)]), index=4)
    # 160 x 96 -> 3 x 2 tiles + thumbnail = 7 tiles of 56 px, 4 tokens each
    assert rp.pixel_values.shape == (7, 3, 56, 56) and rp.index == 4
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert rp.prompt_ids.count(context) == 7 * IMAGE_SEQ_LENGTH
    text = tok.decode(rp.prompt_ids)
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT>") and "</img>\nWhat colour?" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(rp.chosen_ids) == "Red.<|im_end|>\n"
    assert tok.decode(rp.rejected_ids) == "Blue.<|im_end|>\n"


def test_max_patches_per_pair(tiny_models, image_file):
    rp = Renderer(tiny_models["internvl"]).render(make_pair([str(image_file)], max_patches=1))
    assert rp.pixel_values.shape[0] == 1


def test_text_only_models(tiny_models):
    for arch in ("qwen2", "llama"):
        r = Renderer(tiny_models[arch])
        rp = r.render(make_pair())
        assert rp.pixel_values is None and r.tokenizer.decode(rp.chosen_ids) == "Red.<|im_end|>\n"
        with pytest.raises(BadPair, match="no_vision"):
            r.render(make_pair(["x.png"]))


def test_model_without_chat_template(tiny_models, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for f in tiny_models["qwen2"].iterdir():
        if f.name != "chat_template.jinja":
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    r = Renderer(folder)
    assert not r.tokenizer.chat_template
    rp = r.render(make_pair(question="Q?"))
    assert r.tokenizer.decode(rp.prompt_ids) == "Q?" and r.tokenizer.decode(rp.chosen_ids) == "Red.<|im_end|>"


def test_unreadable_images(tiny_models, tmp_path):
    r = Renderer(tiny_models["internvl"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(BadPair, match="corrupt_image"):
        r.render(make_pair([str(bad)]))
    with pytest.raises(BadPair, match="corrupt_image"):
        r.render(make_pair([b"\x89PNG garbage"]))
    with pytest.raises(BadPair, match="missing_image"):
        r.render(make_pair([str(tmp_path / "gone.png")]))


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        Renderer(tmp_path / "nope")


@pytest.mark.parametrize("layout", ["prefix", "plain"])
def test_overlong_truncates_responses_not_the_prompt(tiny_models, layout):
    r = Renderer(tiny_models["qwen2"])
    rp = r.render(make_pair(chosen="x " * 40, rejected="y " * 10))
    P, C, R = len(rp.prompt_ids), len(rp.chosen_ids), len(rp.rejected_ids)
    budget = pair_cost(rp, layout) - 20
    cut = fit_to_budget(rp, layout, budget, "truncate")
    assert pair_cost(cut, layout) == budget and cut.prompt_ids == rp.prompt_ids
    assert len(cut.rejected_ids) == R and len(cut.chosen_ids) == C - 20  # the longer one is cut
    with pytest.raises(BadPair, match="too_long"):
        fit_to_budget(rp, layout, budget, "drop")
    with pytest.raises(BadPair, match="too_long"):  # not even the prompt fits
        fit_to_budget(rp, layout, P, "truncate")


def test_index_counts_render_stage_rejects(tiny_models, tmp_path):
    meta = tmp_path / "ann.jsonl"
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    lines = [{"image": "ok.png", "question": "Q", "chosen": "a", "rejected": "b"},
             {"image": "bad.png", "question": "Q", "chosen": "a", "rejected": "b"},
             {"question": "Q", "chosen": "a " * 300, "rejected": "b"}]
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rejects = Rejects()
    opts = PackingOptions(max_tokens=200, overlong="drop")
    pairs = PairDataset.open(tiny_models["internvl"], meta, opts, rejects)
    assert pairs.valid.tolist() == [0] and len(pairs.index) == 3 and pairs.index.truncated == 0
    assert dict(rejects.counts) == pairs.rejected == {"corrupt_image": 1, "too_long": 1}
    with pytest.raises(DataError, match=r"ann\.jsonl:2: corrupt_image"):
        PairDataset.open(tiny_models["internvl"], meta, opts, Rejects(strict=True))


def test_data_order_rows_respect_the_budget_and_keep_data_order(tiny_models, demo_data):
    opts = PackingOptions(layout="prefix", max_tokens=700)
    pairs = PairDataset.open(tiny_models["internvl"], demo_data / "meta.json", opts, Rejects())
    rows = list(pairs.loader(pairs.data_order_rows(window=10)))
    seen = torch.cat([b.pair_index for b in rows]).tolist()
    assert sorted(seen) == list(range(27))
    assert all(b.num_tokens <= 700 and b.num_pairs >= 1 for b in rows)
    assert all(b.pair_index.tolist() == sorted(b.pair_index.tolist()) for b in rows)
    assert len(rows) < 27  # several pairs per row


def test_images_of_a_pair_share_the_tile_budget(tiny_models, image_file):
    """Like InternVL's MPO data code: n images get max(1, max_patches // n) tiles each."""
    r = Renderer(tiny_models["internvl"])
    question = "<image>\n<image>\n<image>\nCompare."
    rp = r.render(make_pair([str(image_file)] * 3, question=question))
    # budget 6 // 3 = 2 tiles per 160 x 96 image: a 2 x 1 grid + thumbnail = 3 tiles
    assert rp.pixel_values.shape[0] == 3 * 3
    one = r.render(make_pair([str(image_file)]))
    assert one.pixel_values.shape[0] == 7


@pytest.mark.parametrize("text", ["<IMG_CONTEXT>", "<img>", "</img>", "<|im_end|>", "<|im_start|>"])
@pytest.mark.parametrize("where", ["question", "chosen"])
def test_control_tokens_in_text_are_rejected(tiny_models, image_file, text, where):
    r = Renderer(tiny_models["internvl"])
    kw = {"question": f"<image>\nWhat is {text}?"} if where == "question" else {"chosen": f"It is {text}."}
    with pytest.raises(BadPair, match="control token"):
        r.render(make_pair([str(image_file)], **kw))


def test_every_added_token_of_the_tokenizer_is_a_control_token(tiny_models, image_file):
    """Taken from the tokenizer, not a hand-kept list: each special or added token is refused in
    any message (system and assistant turns too), the data's own <image> placeholder is not."""
    r = Renderer(tiny_models["internvl"])
    tokens = set(r.tokenizer.all_special_tokens) | set(r.tokenizer.get_added_vocab())
    assert len(tokens - {"<image>"}) >= 5
    for token in sorted(tokens - {"<image>"}):
        for role in ("system", "user"):
            pair = PreferencePair(({"role": role, "content": f"x {token} y"},
                                   {"role": "user", "content": "<image>\nQ"}),
                                  "a", "b", (str(image_file),))
            with pytest.raises(BadPair, match="control token"):
                r.render(pair)
    r.render(make_pair([str(image_file)]))  # the placeholder itself is fine


def test_responses_identical_after_truncation_are_rejected(tiny_models):
    r = Renderer(tiny_models["qwen2"])
    long = "the same long reasoning " * 30
    rp = r.render(PreferencePair(({"role": "user", "content": "Q"},), long + "so yes", long + "so no"))
    budget = len(rp.prompt_ids) + 41  # room for 21 + 21 tokens: both cut inside their shared start
    with pytest.raises(BadPair, match="identical_responses: after cutting both"):
        fit_to_budget(rp, "prefix", budget, "truncate")


def test_images_over_the_pixel_limit_are_rejected_from_their_header(tiny_models, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(big)
    r = Renderer(tiny_models["internvl"], ImageOptions(max_image_pixels=100_000))
    pair = PreferencePair(({"role": "user", "content": "<image>\nWhat?"},), "a", "b", (str(big),))
    for pixels in (True, False):
        with pytest.raises(BadPair, match=r"image_too_large: .*400x300 > 100000 pixels"):
            r.render(pair, pixels=pixels)
    assert Renderer(tiny_models["internvl"], ImageOptions(max_image_pixels=120_000)).render(pair).tiles > 0


def test_qwen_pixel_range_sizes_images_in_counts_and_in_full(tiny_models, tmp_path):
    """data.min_pixels / max_pixels reach the image processor, and the header-only count agrees."""
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (400, 300)).save(big)
    Image.new("RGB", (30, 30)).save(small)
    pad = "<|image_pad|>"

    def slots(options, image):
        r = Renderer(tiny_models["qwen2_vl"], options)
        full, counted = r.render(make_pair([str(image)])), r.render(make_pair([str(image)]), pixels=False)
        assert counted.prompt_ids == full.prompt_ids and counted.tiles == full.tiles
        return full.prompt_ids.count(r.tokenizer.convert_tokens_to_ids(pad)), full.image_grid_thw.tolist()

    assert slots(ImageOptions(), big) == (12, [[1, 6, 8]])  # the processor's range: 784 to 16 x 784 pixels
    assert slots(ImageOptions(max_pixels=4 * 784), big) == (2, [[1, 2, 4]])
    assert slots(ImageOptions(), small) == (1, [[1, 2, 2]])
    assert slots(ImageOptions(min_pixels=9 * 784), small) == (9, [[1, 6, 6]])


def test_a_sizing_option_the_family_lacks_is_refused(tiny_models):
    with pytest.raises(ValueError, match="max_pixels does not apply to internvl"):
        Renderer(tiny_models["internvl"], ImageOptions(max_pixels=10_000))
    with pytest.raises(ValueError, match="max_patches does not apply to qwen2_5_vl"):
        Renderer(tiny_models["qwen2_5_vl"], ImageOptions(max_patches=4))
    with pytest.raises(ValueError, match="min_pixels .* is above max_pixels"):
        ImageOptions(min_pixels=5000, max_pixels=4000)
    Renderer(tiny_models["qwen2"], ImageOptions())  # a text model takes none and needs none
