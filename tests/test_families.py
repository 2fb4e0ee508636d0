"""Model families: each tiny model finds its family, the family's module roles partition the model
(freezing and MFU read them), text documents keep plain positions in every M-RoPE row, and the
blank image runs through the vision tower."""

import dataclasses

import pytest
import torch
from transformers import AutoConfig, LlavaConfig

from mpo.data.packing import SHARED, PackedBatch
from mpo.models.families import Family, InternVL, QwenVL, family_of
from mpo.models.loading import load_model, packed_hidden_states
from mpo.train.config import load_config
from mpo.train.engine import freeze
from mpo.train.metrics import flops_per_token

EXPECTED = {"internvl": InternVL, "qwen2_vl": QwenVL, "qwen2_5_vl": QwenVL, "qwen3_vl": QwenVL, "qwen2": Family,
            "llama": Family}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_each_tiny_model_finds_its_family(tiny_models, arch):
    assert type(family_of(AutoConfig.from_pretrained(tiny_models[arch]))) is EXPECTED[arch]


def test_an_unsupported_vision_language_model_is_named():
    with pytest.raises(ValueError, match="model type 'llava'.*not supported"):
        family_of(LlavaConfig())


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llama"])
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


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_text_positions_are_plain_in_every_mrope_row(tiny_models, arch):
    family = family_of(AutoConfig.from_pretrained(tiny_models[arch]))
    positions = family.positions(list(range(5, 40)), None)
    assert torch.equal(positions, torch.arange(35).expand(3, -1))


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
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
