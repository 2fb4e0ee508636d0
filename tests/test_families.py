"""Model families: each tiny model finds its family, the family's module roles partition the model
(freezing and MFU read them), image token ids and tile counts are the processor's, text documents
keep plain positions in every M-RoPE row, and the blank image runs through the vision tower."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, LlavaConfig

from mpo.data.packing import SHARED, PackedBatch
from mpo.data.records import PreferencePair
from mpo.data.render import Renderer
from mpo.errors import BadPair
from mpo.families import Family, Gemma3, InternVL, QwenVL, family_of
from mpo.models.loading import load_model, packed_hidden_states
from mpo.models.tiny import MAX_PATCHES
from mpo.train.config import load_config
from mpo.train.engine import freeze
from mpo.train.metrics import flops_per_token

EXPECTED = {"internvl": InternVL, "qwen2_vl": QwenVL, "qwen2_5_vl": QwenVL, "qwen3_vl": QwenVL, "gemma3": Gemma3,
            "qwen2": Family, "llama": Family}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_each_tiny_model_finds_its_family(tiny_models, arch):
    assert type(family_of(AutoConfig.from_pretrained(tiny_models[arch]))) is EXPECTED[arch]


def test_an_unsupported_vision_language_model_is_named():
    with pytest.raises(ValueError, match="model type 'llava'.*not supported"):
        family_of(LlavaConfig())


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llama"])
def test_module_roles_partition_the_model_and_drive_freezing_and_flops(tiny_models, arch):
    model = load_model(tiny_models[arch])
    family = family_of(model.config)
    parts = family.parts(model)
    owner = {}
    for role, modules in parts.items():
        for module in modules:
            for p in module.parameters():
                assert id(p) not in owner or owner[id(p)] == role, f"a parameter in {owner[id(p)]} and {role}"
                owner[id(p)] = role
    assert set(owner) == {id(p) for p in model.parameters()}, "a parameter has no role"
    if family.vision:
        assert parts["vision"] and parts["projector"]
    language = [p for p in model.parameters() if owner[id(p)] == "language"]
    # the embeddings are tied to the LM head in the tiny models: counted once, as the head
    assert flops_per_token(model, model.get_output_embeddings().weight) == 6 * sum(p.numel() for p in language)
    for role in ("vision", "projector") if family.vision else ():
        fresh = load_model(tiny_models[arch])
        overrides = [f"model.path={tiny_models[arch]}", "data.train=x", f"model.freeze_{role}=true"]
        freeze(fresh, load_config(None, overrides))
        frozen = {id(p) for m in family.parts(fresh)[role] for p in m.parameters()}
        assert frozen and all(not p.requires_grad for m in family.parts(fresh)[role] for p in m.parameters())
        assert all(p.requires_grad for p in fresh.parameters() if id(p) not in frozen)
        # vision and projector weights never count, frozen or not
        assert flops_per_token(fresh, fresh.get_output_embeddings().weight) == 6 * sum(p.numel() for p in language)


VISION = ["internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"]


def reference_processor(model_dir, monkeypatch):
    """The model folder's own processor: AutoProcessor where it loads. Its video half needs
    torchvision (no working CPU build here); without it, the processor class processor_config.json
    names, built from the folder's image processor and tokenizer with no video processor (the
    class check of each part looks the video processor class up, which needs torchvision: skipped
    for the absent part). Either way the processor's own string expansion makes the ids."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except ImportError:
        pass
    config = json.loads((model_dir / "processor_config.json").read_text())
    cls = getattr(transformers, config["processor_class"])
    extra = {k: v for k, v in config.items() if k not in ("image_processor", "video_processor", "processor_class")}
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: arg is None or check(self, name, arg))
    return cls(image_processor=AutoImageProcessor.from_pretrained(model_dir),
               tokenizer=AutoTokenizer.from_pretrained(model_dir), video_processor=None, **extra)


def random_images(n: int) -> list[Image.Image]:
    """n noise images of random odd sizes, 13 to 401 px a side."""
    sizes = 2 * torch.randint(6, 201, (n, 2)) + 1
    return [Image.fromarray(np.random.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes.tolist()]


def layouts(token: str, n: int) -> list[str]:
    """Prompts with n placeholders: text glued to them with no space, one at the very start and the
    end, adjacent ones, and text and whitespace around and between them."""
    glued = token + "".join(f"a{i}b" + token for i in range(n - 1))
    listed = " and\n".join([token] * n)
    return [glued, f"x{glued}y", f"What is {listed}?\n", f"\n {token * n}  ", f"the{token}  {token * (n - 1)}the"]


def image_kwargs(arch: str, n: int) -> dict:
    """What the processor is called with: InternVL shares its tile budget among a prompt's images."""
    return {"crop_to_patches": True, "max_patches": max(1, MAX_PATCHES // n)} if arch == "internvl" else {}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("arch", VISION)
def test_image_token_ids_and_tiles_are_the_processors(tiny_models, monkeypatch, arch, n):
    """`encode` (from pixels) and `count` (from image sizes alone, the cost pass) give the ids the
    processor gives, and the processor's pixels, grid and tile (patch) count."""
    processor = reference_processor(tiny_models[arch], monkeypatch)
    images = Renderer(tiny_models[arch]).images
    pictures = random_images(n)
    sizes = [(im.height, im.width) for im in pictures]
    for text in layouts(images.image_token, n):
        want = processor(text=[text], images=pictures, add_special_tokens=False, return_tensors="pt",
                         **image_kwargs(arch, n))
        ids, pixels, grid = images.encode(text, pictures, None)
        counted, tiles = images.count(text, sizes, None)
        assert ids == counted == want["input_ids"][0].tolist(), text
        # a tile (Qwen-VL: a patch) is one row of pixel values
        assert tiles == want["pixel_values"].shape[0] and torch.equal(pixels, want["pixel_values"].float())
        assert grid is None or torch.equal(grid, want["image_grid_thw"])
        assert ids.count(images.slot_id) == images.slots(tiles)


@pytest.mark.parametrize("arch", VISION)
def test_text_only_prompts_on_vision_models_are_the_processors(tiny_models, monkeypatch, arch):
    processor = reference_processor(tiny_models[arch], monkeypatch)
    renderer = Renderer(tiny_models[arch])
    pair = PreferencePair(({"role": "user", "content": "x" * torch.randint(1, 9, ()).item() + " the sum?"},),
                          "a", "b")
    text = renderer.tokenizer.apply_chat_template(list(pair.prompt), tokenize=False, add_generation_prompt=True)
    want = processor(text=[text], add_special_tokens=False)["input_ids"][0]
    assert renderer.render(pair).prompt_ids == renderer.render(pair, pixels=False).prompt_ids == want


@pytest.mark.parametrize("arch", ["internvl", "qwen2_5_vl", "gemma3"])
def test_placeholders_unlike_the_images_in_number_reject_the_pair(tiny_models, arch):
    images = Renderer(tiny_models[arch]).images
    pictures = random_images(2)
    for text in (images.image_token, images.image_token * 3):
        with pytest.raises(BadPair, match="image_mismatch"):
            images.count(text, [(im.height, im.width) for im in pictures], None)
        with pytest.raises(BadPair, match="image_mismatch"):
            images.encode(text, pictures, None)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_text_positions_are_plain_in_every_mrope_row(tiny_models, arch):
    family = family_of(AutoConfig.from_pretrained(tiny_models[arch]))
    positions = family.positions(list(range(5, 40)), None)
    assert torch.equal(positions, torch.arange(35).expand(3, -1))


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"])
def test_a_text_only_row_runs_the_vision_tower_on_the_blank_image(tiny_models, arch):
    """The blank image is an extra document: the row's own hidden states equal the text model's
    output without it, and the vision tower's parameters receive gradients."""
    model = load_model(tiny_models[arch])
    family = family_of(model.config)
    ids, pixels, grid = family.blank_image()
    assert ids.count(model.config.image_token_id) == len(ids)
    n = 12
    one = torch.zeros((1, n), dtype=torch.long)
    batch = PackedBatch(input_ids=torch.arange(20, 20 + n)[None], position_ids=positions_of(family, n),
                        labels=one - 100, seq_ids=one - 1, doc_ids=one, branch_ids=one + SHARED,
                        cu_seqlens=torch.tensor([0, n], dtype=torch.int32), pixel_values=None,
                        pair_index=torch.zeros(0, dtype=torch.long), layout="plain")
    hidden = packed_hidden_states(model, batch, backend="sdpa")
    assert hidden.shape == (n, model.config.get_text_config().hidden_size)
    hidden.sum().backward()
    vision = [p for m in family.parts(model)["vision"] for p in m.parameters()]
    assert all(p.grad is not None for p in vision[:1]), "the vision tower did not run"
    stock = family.auto_class().from_pretrained(tiny_models[arch], attn_implementation="sdpa").eval()
    with torch.no_grad():
        alone = stock.model.language_model(input_ids=batch.input_ids, use_cache=False,
                                           position_ids=batch.position_ids).last_hidden_state[0]
    torch.testing.assert_close(hidden.detach(), alone, rtol=1e-5, atol=1e-5)


def positions_of(family, n):
    rows = family.positions(list(range(n)), None)
    return rows if rows.shape[0] == 1 else rows[:, None]


def test_packed_rows_look_the_family_up_once_per_model(tiny_models, monkeypatch):
    """packed_hidden_states runs on every row: the model's family is found on the first and kept
    (the same hidden states as a fresh lookup), and found again for a model with another config."""
    import mpo.models.loading as loading

    model = load_model(tiny_models["internvl"]).eval()
    family = family_of(model.config)
    n = 10
    one = torch.zeros((1, n), dtype=torch.long)
    batch = PackedBatch(input_ids=torch.randint(20, 200, (1, n)), position_ids=positions_of(family, n),
                        labels=one - 100, seq_ids=one - 1, doc_ids=one, branch_ids=one + SHARED,
                        cu_seqlens=torch.tensor([0, n], dtype=torch.int32), pixel_values=None,
                        pair_index=torch.zeros(0, dtype=torch.long), layout="plain")
    with torch.no_grad():
        first = packed_hidden_states(model, batch, backend="sdpa")
        lookups = []
        real = loading.family_of
        monkeypatch.setattr(loading, "family_of", lambda config: lookups.append(config) or real(config))
        again = [packed_hidden_states(model, batch, backend="sdpa") for _ in range(3)]
        assert lookups == []
        assert all(torch.equal(first, h) for h in again)
        other = load_model(tiny_models["qwen2_vl"]).eval()
        lookups.clear()
        packed_hidden_states(other, dataclasses.replace(batch, position_ids=positions_of(QwenVL(other.config), n)),
                             backend="sdpa")
        assert len(lookups) == 1 and lookups[0] is other.config


@pytest.mark.parametrize("arch", ["internvl", "qwen2_5_vl", "llama"])
def test_4bit_keeps_the_vision_side_and_the_lm_head_unquantized(tiny_models, arch):
    """QLoRA's BitsAndBytesConfig skips exactly the vision tower, the projector and the LM head:
    transformers' own matcher leaves their linear layers alone and converts every other one."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from mpo.models.quantized import bnb_4bit

    config = AutoConfig.from_pretrained(tiny_models[arch])
    family = family_of(config)
    quant = bnb_4bit(family.auto_class(), config, torch.bfloat16)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    model = load_model(tiny_models[arch])
    parts = family.parts(model)
    kept = {id(sub) for part in [*parts["vision"], *parts["projector"], model.get_output_embeddings()]
            for sub in part.modules()}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(id(m) not in kept for _, m in linears)
    for name, m in linears:
        assert should_convert_module(name, quant.llm_int8_skip_modules) == (id(m) not in kept), name
