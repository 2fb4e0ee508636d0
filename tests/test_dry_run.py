"""`mpo train CONFIG --dry-run`: the trainer's plan and parameter counts from a model folder without
weights, model states as DeepSpeed's estimators give them, the activation formula against what
autograd keeps, and an 8B-shaped config-only folder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from commands import write_config
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from mpo.cli import main
from mpo.data.dataset import PairDataset
from mpo.data.packing import PackingOptions
from mpo.data.records import Rejects
from mpo.models.lora import add_lora, default_targets
from mpo.train.config import load_config
from mpo.train.data import TrainPlan
from mpo.train.dry_run import activation_bytes, dlogits_columns, dry_run, loss_buffer_bytes

KEYS = ("parameters", "trainable_parameters", "ranks", "zero_stage", "model_states_bytes_per_rank",
        "activation_bytes_longest_row", "loss_buffer_bytes", "total_bytes_per_rank", "fits", "steps", "rows",
        "longest_row_tokens")
WEIGHTS = ("model.safetensors", "generation_config.json")
ROOT = Path(__file__).resolve().parents[1]


def config_only(model_dir, out):
    """A copy of a model folder without its weights: config, tokenizer and processor files."""
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name not in WEIGHTS:
            shutil.copy(f, out / f.name)
    return out


def shaped(tiny_dir, out, arch):
    """A config-only folder with a real model's shapes (InternVL3-8B: Qwen2.5-7B's text model and
    InternViT-300M; Qwen2.5-VL-7B) and the tiny model's tokenizer and processor files."""
    from transformers import AutoConfig, InternVLConfig

    small = AutoConfig.from_pretrained(tiny_dir)
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
                eos_token_id=small.text_config.eos_token_id, pad_token_id=small.text_config.pad_token_id)
    if arch == "internvl":
        config = InternVLConfig(
            text_config=dict(model_type="qwen2", vocab_size=151674, **text),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=448, patch_size=14, attention_bias=True, use_mean_pooling=True,
                               layer_scale_init_value=0.1),
            image_token_id=small.image_token_id, image_seq_length=256, downsample_ratio=0.5,
            projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
            tie_word_embeddings=False)
    else:
        config = AutoConfig.for_model(
            "qwen2_5_vl", tie_word_embeddings=False,
            text_config=dict(vocab_size=152064, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                     mrope_section=[16, 24, 24]), **text),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31]),
            **{f"{k}_token_id": getattr(small, f"{k}_token_id") for k in ("image", "video", "vision_start",
                                                                          "vision_end")})
    config.architectures = [type(config).__name__.replace("Config", "ForConditionalGeneration")]
    config_only(tiny_dir, out)
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def weightless(tiny_models, tmp_path_factory):
    return config_only(tiny_models["internvl"], tmp_path_factory.mktemp("weightless") / "internvl")


def real_model(tiny_models, cfg):
    """The tiny model with its weights, frozen and adapted as the trainer's engine does."""
    from mpo.models.loading import load_model
    from mpo.train.engine import freeze

    model = load_model(tiny_models["internvl"])
    freeze(model, cfg)
    if cfg.lora.r:
        add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                 cfg.lora.modules_to_save)
    return model


@pytest.mark.parametrize("config, ranks", [("test", 1), ("test", 3), ("demo.yaml", 2)])
def test_the_plan_is_the_trainers(tmp_path, weightless, tiny_models, demo_data, config, ranks):
    if config == "test":
        cfg = load_config(write_config(tmp_path / "c.yaml", weightless, demo_data,
                                       train={"max_steps": 0, "epochs": 2}))
    else:  # the built-in demo's MPO stage, on this model folder and data
        cfg = load_config(ROOT / "configs" / config, [f"model.path={weightless}",
                                                      f"data.train={demo_data / 'meta.json'}",
                                                      f"train.output_dir={tmp_path / 'run'}"])
    report = dry_run(cfg, ranks=ranks)

    # the real plan, on the folder with its weights (the pair index ignores them)
    packing = PackingOptions(cfg.data.packing, cfg.train.max_tokens_per_row, cfg.data.overlong)
    pairs = PairDataset.open(tiny_models["internvl"], demo_data / "meta.json", packing, Rejects())
    plan = TrainPlan(pairs, seed=cfg.train.seed, global_batch_pairs=cfg.train.global_batch_pairs,
                     window=cfg.data.shuffle_window)
    steps = cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch
    dealt = [plan.rows(step, ranks)[1] for step in range(steps)]
    rows = [row for step in dealt for mine in step for row in mine]
    assert report["pairs"] == len(pairs.valid) == 27
    assert report["steps"] == steps == (400 if config == "demo.yaml" else 8)
    assert report["rows"] == len(rows)
    assert report["micro_batches_per_rank"] == max(len(mine) for step in dealt for mine in step)
    assert report["longest_row_tokens"] == max(int(pairs.costs[list(row)].sum()) for row in rows)
    assert report["tokens_per_step_max"] == max(int(pairs.costs[plan.step_pairs(s)].sum()) for s in range(steps))
    assert not (tmp_path / "run").exists()  # nothing written: no data.index_dir, the index stays in memory


@pytest.mark.parametrize("sections", [{}, {"model": {"freeze_vision": True, "freeze_projector": True}},
                                      {"lora": {"r": 4, "alpha": 8.0}},
                                      {"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"],
                                                "modules_to_save": ["multi_modal_projector"]}}])
def test_parameter_counts_are_the_real_models(tmp_path, weightless, tiny_models, demo_data, sections):
    cfg = load_config(write_config(tmp_path / "c.yaml", weightless, demo_data, **sections))
    report = dry_run(cfg)
    model = real_model(tiny_models, cfg)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.lora.r and not cfg.lora.target_modules:  # r * (in + out) per adapted linear layer
        base = real_model(tiny_models, load_config(write_config(tmp_path / "base.yaml", weightless, demo_data)))
        linears = dict(base.named_modules())
        adapters = sum(cfg.lora.r * (linears[n].in_features + linears[n].out_features) for n in default_targets(base))
        assert report["trainable_parameters"] == adapters


@pytest.mark.parametrize("stage, ranks, freeze", [(3, 1, False), (3, 8, False), (3, 8, True), (2, 4, False),
                                                   (2, 4, True), (1, 4, True), (0, 1, False)])
def test_model_states_are_deepspeeds_estimate(tmp_path, weightless, tiny_models, demo_data, stage, ranks, freeze):
    cfg = load_config(write_config(tmp_path / "c.yaml", weightless, demo_data, deepspeed={"zero_stage": stage},
                                   model={"freeze_vision": freeze}))
    report = dry_run(cfg, ranks=ranks)
    model = real_model(tiny_models, cfg)
    total, largest = model_to_params(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = total - trainable
    if stage == 3:
        expected = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=ranks,
                                                         cpu_offload=False)[1] + 2 * frozen // ranks
    else:
        expected = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=ranks, cpu_offload=False)[1] \
            + 2 * frozen
    if stage == 1:  # the whole 16-bit gradient on every rank, not a shard
        expected += 2 * trainable - 2 * trainable // ranks
    assert report["model_states_bytes_per_rank"] == expected
    if freeze:
        assert 0 < trainable < total
    assert report["total_bytes_per_rank"] == (report["model_states_bytes_per_rank"] + report["loss_buffer_bytes"]
                                              + report["activation_bytes_longest_row"])


@pytest.mark.parametrize("offload_params", [False, True])
def test_offload_as_deepspeeds_estimate(tmp_path, weightless, tiny_models, demo_data, offload_params):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "cpu" if offload_params else "none"}}}))
    cfg = load_config(write_config(tmp_path / "c.yaml", weightless, demo_data,
                                   deepspeed={"zero_stage": 3, "offload_optimizer": True, "config": str(ds)}))
    report = dry_run(cfg, ranks=4)
    total, largest = model_to_params(real_model(tiny_models, cfg))
    assert report["offload_optimizer"] and report["offload_params"] == offload_params
    assert report["model_states_bytes_per_rank"] == estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=4, cpu_offload=True, cpu_offload_params=offload_params)[1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_is_what_autograd_keeps(checkpointing):
    """A bf16 Qwen2 forward (SDPA on the CPU keeps what flash-attn keeps): the tensors autograd
    holds, counted once each, against the formula less what the formula adds beyond one forward
    (the final hidden state the fused loss keeps; with checkpointing, RoPE's cos and sin, which
    the checkpointed layers hold as inputs, and the one layer recomputed in backward)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=96, intermediate_size=208, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tokens = 61
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 300, (1, tokens)), use_cache=False)
    h, d, layers = config.hidden_size, config.hidden_size // config.num_attention_heads, config.num_hidden_layers
    full = activation_bytes(config, tokens, checkpointing=False)
    beyond = 2 * h * tokens
    if checkpointing:
        checkpointed = activation_bytes(config, tokens, checkpointing=True)
        # full - checkpointed = (layers - 1) recomputable layers less every layer's kept input
        recomputed = (full - checkpointed + layers * 2 * h * tokens) // (layers - 1)
        beyond += recomputed + 4 * d * tokens
        full = checkpointed
    assert sum(kept.values()) == full - beyond


def test_loss_buffers_never_hold_logits():
    tokens, scored, hidden, vocab = 16384, 9000, 3584, 151674
    buffers = loss_buffer_bytes(tokens, scored, hidden, vocab)
    assert buffers < 2 * scored * vocab / 8  # far below the bf16 logits [M x V]
    assert buffers >= 2 * tokens * hidden  # at least dH [N, D]
    assert loss_buffer_bytes(tokens, scored, hidden, vocab, bias=True) > buffers


def test_dlogits_chunk_is_the_kernels():
    pytest.importorskip("triton")
    from mpo.kernels.config import family_config
    from mpo.kernels.logits_grad import scratch_columns

    for cfg in (family_config(90, torch.bfloat16), family_config(80, torch.bfloat16), family_config(75, torch.float16)):
        for scored in (0, 1, 97, 4096, 70001):
            for vocab in (300, 32000, 151674):
                assert dlogits_columns(scored, vocab, cfg) == scratch_columns(scored, 2, vocab, cfg)


def test_an_online_reference_adds_its_weights(tmp_path, weightless, demo_data):
    cached = dry_run(load_config(write_config(tmp_path / "c.yaml", weightless, demo_data)), ranks=2)
    online = dry_run(load_config(write_config(tmp_path / "o.yaml", weightless, demo_data,
                                              loss={"impl": "torch", "reference": "online"})), ranks=2)
    assert online["reference_bytes_per_rank"] == 2 * online["parameters"] // 2
    assert online["total_bytes_per_rank"] == cached["total_bytes_per_rank"] + online["reference_bytes_per_rank"]
    lora = dry_run(load_config(write_config(tmp_path / "l.yaml", weightless, demo_data, lora={"r": 4},
                                            loss={"impl": "torch", "reference": "online"})), ranks=2)
    assert lora["reference_bytes_per_rank"] == 0  # the policy without its adapters is the reference


@pytest.mark.parametrize("arch", ["internvl", "qwen2_5_vl"])
def test_an_8b_shaped_folder_dry_runs_on_64_ranks(tmp_path, tiny_models, demo_data, arch):
    from transformers import AutoConfig

    model = shaped(tiny_models[arch], tmp_path / "model", arch)
    cfg = load_config(write_config(tmp_path / "c.yaml", model, demo_data,
                                   model={"dtype": "bf16", "gradient_checkpointing": True},
                                   loss={"impl": "auto"}, train={"max_tokens_per_row": 16384, "max_steps": 0}))
    report = dry_run(cfg, ranks=64)
    assert 7.5e9 < report["parameters"] == report["trainable_parameters"] < 8.5e9
    assert report["activation_bytes_checkpointing"] < report["activation_bytes_no_checkpointing"]
    assert report["activation_bytes_longest_row"] == report["activation_bytes_checkpointing"]
    text = AutoConfig.from_pretrained(model).text_config
    embedding = text.vocab_size * text.hidden_size  # the largest layer (as the LM head)
    assert report["model_states_bytes_per_rank"] == estimate_zero3_model_states_mem_needs(
        report["parameters"], embedding, num_gpus_per_node=64, cpu_offload=False)[1]
    assert report["fits"]
    assert not report["notes"]


def test_json_output(tmp_path, weightless, demo_data, capsys):
    config = write_config(tmp_path / "c.yaml", weightless, demo_data)
    assert main(["train", str(config), "--dry-run", "--ranks", "4", "--gpu-memory", "0.001", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(KEYS) <= set(report)
    assert report["ranks"] == 4 and report["zero_stage"] == 3
    assert report["fits"] is (report["total_bytes_per_rank"] <= 0.001 * 2**30)
    assert main(["train", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model states" in out and "fits" in out and "note: model.dtype is fp32" in out


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--ranks", "0"], "--ranks"),
    (["--dry-run", "--gpu-memory", "0"], "--gpu-memory"),
    (["--dry-run", "--gpu-memory", "nan"], "--gpu-memory"),
    (["--ranks", "4"], "--dry-run"),
])
def test_bad_input_names_the_flag(tmp_path, weightless, demo_data, capsys, args, message):
    config = write_config(tmp_path / "c.yaml", weightless, demo_data)
    assert main(["train", str(config), *args]) == 1
    assert message in capsys.readouterr().err
    assert main(["train", "--dry-run"]) == 1
    assert "CONFIG" in capsys.readouterr().err


def test_the_index_goes_to_data_index_dir(tmp_path, weightless, demo_data):
    cfg = load_config(write_config(tmp_path / "c.yaml", weightless, demo_data,
                                   data={"index_dir": str(tmp_path / "index")}))
    first = dry_run(cfg)
    (index,) = (tmp_path / "index").glob("pairs-*.safetensors")
    built = index.stat().st_mtime_ns
    assert dry_run(cfg) == first
    assert index.stat().st_mtime_ns == built  # loaded, not built again


def test_sequence_parallel_splits_each_row_not_the_plan(tmp_path, weightless, demo_data):
    """2 data ranks with 512-token rows, or 4 ranks in sequence-parallel pairs with 256 tokens a rank:
    the same rows; each rank keeps the activations of half the longest row."""
    whole = dry_run(load_config(write_config(tmp_path / "a.yaml", weightless, demo_data,
                                             train={"max_tokens_per_row": 512})), ranks=2)
    split = dry_run(load_config(write_config(tmp_path / "b.yaml", weightless, demo_data,
                                             train={"max_tokens_per_row": 256, "sequence_parallel_size": 2})),
                    ranks=4)
    for key in ("rows", "longest_row_tokens", "micro_batches_per_rank", "steps"):
        assert split[key] == whole[key], key
    text = load_config(tmp_path / "a.yaml").model.path
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(text).get_text_config()
    tokens = whole["longest_row_forward_tokens"]
    assert whole["activation_bytes_longest_row"] == activation_bytes(config, tokens, checkpointing=False)
    assert split["activation_bytes_longest_row"] == activation_bytes(config, -(-tokens // 2), checkpointing=False)
    assert split["sequence_parallel_size"] == 2 and split["ranks"] == 4
    with pytest.raises(ValueError, match="sequence_parallel_size 2 must divide the ranks"):
        dry_run(load_config(tmp_path / "b.yaml"), ranks=3)
