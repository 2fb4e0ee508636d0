"""Mixtures of experts (tiny InternVL with a Qwen3-MoE or a GPT-OSS language model, tiny Qwen3-VL-MoE):
routers and sparse blocks found from transformers' own records, the blocks made ZeRO-3 leaves, the
experts loaded under ZeRO-3 as save_pretrained wrote them, active parameters counted from the configs,
the load-balancing loss against transformers' `load_balancing_loss_func` (value and gradients, over the
row's own tokens), LoRA leaving experts and routers alone, and on ranks: 1 = 2 = 4 ranks under ZeRO-3
with experts no token of a rank chose, ending within the time limit, and a row split over 2 ranks."""

import dataclasses
import json

import pytest
import torch
from commands import mpo, rows, write_config
from transformers import AutoConfig

from mpo.data.formats import read_pairs
from mpo.data.packing import pack_row
from mpo.data.records import Rejects
from mpo.data.render import Renderer
from mpo.families import family_of
from mpo.models import moe
from mpo.models.fused_head import PolicyWithLoss
from mpo.models.loading import lm_head, load_model
from mpo.models.lora import add_lora
from mpo.mpo_loss import MPOLoss
from mpo.train.metrics import flops_per_token

MOE = ("internvl_qwen3_moe", "internvl_gpt_oss", "qwen3_vl_moe")
SLOW = pytest.mark.slow


def text_config(path):
    return AutoConfig.from_pretrained(path).get_text_config()


def experts(text) -> int:
    return getattr(text, "num_experts", None) or text.num_local_experts


def expert_weights(text) -> int:
    """Parameters in all experts of all layers: a gate/up [2I, D] and a down [D, I] matrix each;
    GPT-OSS's experts have biases too [2I], [D], and I is its intermediate_size."""
    if text.model_type == "gpt_oss":
        size = text.intermediate_size
        return text.num_hidden_layers * experts(text) * (3 * text.hidden_size * size + 2 * size + text.hidden_size)
    return text.num_hidden_layers * experts(text) * 3 * text.hidden_size * text.moe_intermediate_size


@pytest.mark.parametrize("arch", [*MOE, "internvl", "qwen3_vl"])
def test_routers_and_blocks_come_from_transformers_records(tiny_models, arch):
    from deepspeed.utils import z3_leaf_module

    model = load_model(tiny_models[arch])
    found = moe.routers(model)
    if arch not in MOE:
        assert found == [] and moe.leaf_blocks(model) == [] and moe.active_shares(model) == {}
        return
    text = text_config(tiny_models[arch])
    assert len(found) == text.num_hidden_layers
    classes = moe.leaf_blocks(model)
    assert [c.__name__ for c in classes] == [{"internvl_qwen3_moe": "Qwen3MoeSparseMoeBlock",
                                              "internvl_gpt_oss": "GptOssMLP",
                                              "qwen3_vl_moe": "Qwen3VLMoeTextSparseMoeBlock"}[arch]]
    blocks = [m for m in model.modules() if isinstance(m, tuple(classes))]
    assert len(blocks) == text.num_hidden_layers and all(z3_leaf_module(b) for b in blocks)
    assert not any(z3_leaf_module(m) for m in model.modules() if not isinstance(m, tuple(classes)))


@pytest.mark.parametrize("arch", MOE)
def test_active_parameters_and_flops_count_the_chosen_experts(tiny_models, arch):
    model = load_model(tiny_models[arch])
    text = text_config(tiny_models[arch])
    total = sum(p.numel() for p in model.parameters())
    idle = expert_weights(text) * (1 - text.num_experts_per_tok / experts(text))
    assert moe.parameter_counts(model) == (total, round(total - idle))
    head = lm_head(model).weight
    language = family_of(model.config).parts(model)["language"][0]
    dense = sum(p.numel() for p in language.parameters()) - model.get_input_embeddings().weight.numel()
    assert flops_per_token(model, head) == round(6 * (dense + head.numel() - idle))


def test_the_coefficient_is_the_models_own_unless_set(tiny_models, tmp_path):
    model = load_model(tiny_models["internvl_qwen3_moe"])
    assert moe.router_aux_coef(model, None) == 0.0  # as released: output_router_logits off, transformers adds none
    assert moe.router_aux_coef(model, 0.0) == 0.0 and moe.router_aux_coef(model, 0.02) == 0.02
    model.config.get_text_config().output_router_logits = True
    assert moe.router_aux_coef(model, None) == 0.001
    dense = load_model(tiny_models["internvl"])
    assert moe.router_aux_coef(dense, None) == 0.0
    with pytest.raises(ValueError, match="router_aux_coef 0.01: InternVLForConditionalGeneration has no"):
        moe.router_aux_coef(dense, 0.01)


@pytest.mark.parametrize("arch", MOE)
def test_load_balancing_loss_is_transformers_over_the_rows_own_tokens(tiny_models, arch, random_seed):
    """Recorded for the first `own` tokens of a forward: transformers' loss with an attention mask over
    those tokens, in value and in the router weights' gradients."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = load_model(tiny_models[arch])
    model.set_attn_implementation("eager")
    language = family_of(model.config).parts(model)["language"][0]
    g = torch.Generator().manual_seed(random_seed)
    length = int(torch.randint(5, 60, (), generator=g))
    own = int(torch.randint(1, length + 1, (), generator=g))
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, length), generator=g)
    load = moe.RouterLoad(model)
    with load.recording(own):
        language(input_ids=ids)
    mine, idle = load.loss()
    grads = torch.autograd.grad(mine, [r.weight for r in load.routers])
    logits = language(input_ids=ids, output_router_logits=True).router_logits
    mask = (torch.arange(length) < own)[None].long()
    theirs = load_balancing_loss_func(logits, load.experts, load.top_k, mask)
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-6), random_seed
    for a, b in zip(grads, torch.autograd.grad(theirs, [r.weight for r in load.routers])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9, msg=f"seed {random_seed}")
    chosen = [torch.topk(x[:own].softmax(-1), load.top_k).indices.unique().numel() for x in logits]
    assert idle.item() == pytest.approx(1 - sum(chosen) / (len(logits) * load.experts)), random_seed


@pytest.mark.parametrize("arch", MOE)
def test_a_rows_loss_adds_its_pair_weighted_load_balancing_loss(tiny_models, demo_data, arch):
    """A text-only row of a vision model (the blank image after it is routed too, and not counted):
    the loss with the coefficient minus the loss without it is coef x the row's own load-balancing loss x
    its share of the step's pairs."""
    path = tiny_models[arch]
    model = load_model(path).eval()
    renderer = Renderer(path)
    pairs = [p for p in read_pairs(demo_data / "meta_heldout.json", Rejects())][:3]
    text = [dataclasses.replace(p, images=(), prompt=tuple({**m, "content": m["content"].replace("<image>\n", "")}
                                                            for m in p.prompt)) for p in pairs]
    batch = pack_row([renderer.render(p, i) for i, p in enumerate(text)], "prefix", family_of(model.config).positions)
    ref = torch.zeros(batch.num_pairs)
    out = {}
    for coef in (0.0, 0.25):
        policy = PolicyWithLoss(model, MPOLoss(update_shift=False, impl="torch"), zero3=False, router_aux_coef=coef)
        with torch.no_grad():
            out[coef] = policy(batch, ref, ref, pair_count=8, chosen_token_count=100)
    load = moe.RouterLoad(model)
    hidden = []
    hooks = [r.register_forward_hook(lambda m, a, o: hidden.append(o[0])) for r in load.routers]
    with torch.no_grad():
        PolicyWithLoss(model, MPOLoss(update_shift=False, impl="torch"), zero3=False)(
            batch, ref, ref, pair_count=8, chosen_token_count=100)
    for h in hooks:
        h.remove()
    assert all(len(x) > batch.num_tokens for x in hidden)  # the blank image was routed
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    expected = load_balancing_loss_func(tuple(x[:batch.num_tokens] for x in hidden), load.experts, load.top_k)
    assert out[0.25][1]["loss/router_aux"].item() == pytest.approx(expected.item(), rel=1e-6)
    added = (out[0.25][0] - out[0.0][0]).item()
    assert added == pytest.approx(0.25 * expected.item() * batch.num_pairs / 8, rel=1e-5)


@pytest.mark.parametrize("arch", MOE)
def test_lora_adapts_attention_and_leaves_experts_and_routers_frozen(tiny_models, arch):
    """Adapters go on the language model's linear layers; transformers stores experts as 3-D tensors and
    routers as plain weights, neither a linear layer: they stay frozen (and the routing with them)."""
    model = load_model(tiny_models[arch])
    add_lora(model, 4, 8, 0.0, [], [])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any("self_attn.q_proj" in n for n in trainable)
    assert not [n for n in trainable if ".experts" in n or ".mlp.gate." in n or ".mlp.router." in n], trainable
    shares = moe.active_shares(model)
    assert shares and not any(p.requires_grad for p in model.parameters() if id(p) in shares)


@pytest.mark.parametrize("arch", MOE)
def test_zero3_loads_the_experts_save_pretrained_wrote(tiny_models, one_rank_group, monkeypatch, arch):
    """Partitioned while loading (ZeRO-3), every weight equals a plain load's: Qwen3-VL-MoE's experts
    are not transposed a second time (transformers checks their layout against the partitioned shape)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's partitioning reads it
    plain = load_model(tiny_models[arch])
    partitioning = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    model = load_model(tiny_models[arch])
    del partitioning
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p, q), name


def with_experts(src, out, count: int, top_k: int):
    """A copy of tiny model `src` (Qwen3-MoE) with `count` experts per layer, `top_k` per token (random weights)."""
    from mpo.families import family_of as family

    config = AutoConfig.from_pretrained(src)
    text = config.get_text_config()
    text.num_experts, text.num_experts_per_tok = count, top_k
    torch.manual_seed(0)
    family(config).auto_class().from_config(config).save_pretrained(out)
    for f in src.iterdir():  # tokenizer and processor files
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def compare(one, two, keys):
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["step"], key)


@SLOW
@pytest.mark.parametrize("arch", MOE)
def test_two_ranks_match_one_rank_and_the_export_loads(tmp_path, tiny_models, demo_data, arch):
    """ZeRO-3 on 1 and 2 ranks: the same losses (the load-balancing term included) step for step; the
    start-up line gives total and active parameters; final/ loads with the stock class, no key missing."""
    from transformers import AutoModelForImageTextToText

    config = write_config(tmp_path / "c.yaml", tiny_models[arch], demo_data, loss={"router_aux_coef": 0.01})
    printed = mpo("train", config, "--output-dir", tmp_path / "one", timeout=600).stderr
    assert "M active per token)" in printed, printed[-2000:]
    mpo("train", config, "--output-dir", tmp_path / "two", "checkpoint.export_final=false", ranks=2, timeout=600)
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    compare(one, two, ("loss", "loss/sigmoid", "loss/sft", "loss/router_aux", "rewards/margins"))
    assert all(r["loss/router_aux"] > 0 for r in one)
    model, loading = AutoModelForImageTextToText.from_pretrained(tmp_path / "one" / "final", output_loading_info=True)
    assert not any(loading.values()), loading
    assert type(model).__name__ == json.loads((tiny_models[arch] / "config.json").read_text())["architectures"][0]


@SLOW
def test_four_ranks_with_experts_idle_on_some_rank_match_one_rank(tmp_path, tiny_models, demo_data):
    """16 experts, one per token: on 4 ranks some experts get no token of a rank's row (router/idle_experts
    says so), and ZeRO-3 still gathers every block on every rank: no hang, the 1-rank losses."""
    path = with_experts(tiny_models["internvl_qwen3_moe"], tmp_path / "model", 16, 1)
    config = write_config(tmp_path / "c.yaml", path, demo_data, checkpoint={"export_final": False},
                          loss={"router_aux_coef": 0.01})
    mpo("train", config, "--output-dir", tmp_path / "one", timeout=600)
    mpo("train", config, "--output-dir", tmp_path / "four", ranks=4, timeout=600)
    four = rows(tmp_path / "four")
    assert all(r["router/idle_experts"] > 0 for r in four), [r["router/idle_experts"] for r in four]
    compare(rows(tmp_path / "one"), four, ("loss", "loss/sigmoid", "loss/sft", "loss/router_aux"))


@SLOW
def test_sequence_parallel_ranks_sum_the_load_balancing_counts(tmp_path, tiny_models, demo_data):
    """Each row split over 2 ranks (Ulysses): the load-balancing loss of the whole row, so the losses
    of one rank with the same rows, step for step."""
    runs = {}
    for name, sp in (("one", 1), ("split", 2)):
        config = write_config(tmp_path / f"{name}.yaml", tiny_models["internvl_qwen3_moe"], demo_data,
                              data={"index_dir": str(tmp_path / "index")}, loss={"router_aux_coef": 0.01},
                              train={"max_tokens_per_row": 512 // sp, "sequence_parallel_size": sp, "max_steps": 3},
                              checkpoint={"export_final": False})
        mpo("train", config, "--output-dir", tmp_path / name, ranks=sp, timeout=600)
        runs[name] = rows(tmp_path / name)
    for a, b in zip(runs["one"], runs["split"], strict=True):
        assert a["row_tokens"] == b["row_tokens"]
        for key in ("loss", "loss/sigmoid", "loss/sft", "loss/router_aux", "router/idle_experts"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (a["step"], key)
