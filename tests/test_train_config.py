"""Training config: YAML, dotted overrides, validation naming the key, help text, shipped configs."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from mpo.train.config import help_text, load_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["model.path=m", "data.train=d.jsonl"]


def test_defaults_are_the_paper_recipe():
    cfg = load_config(None, REQUIRED)
    assert cfg.loss.types == ["sigmoid", "bco_pair", "sft"] and cfg.loss.weights == [0.8, 0.2, 1.0]
    assert cfg.loss.beta == 0.1 and cfg.optim.weight_decay == 0.05 and cfg.optim.betas == [0.9, 0.999]
    assert cfg.train.global_batch_pairs == 256 and cfg.deepspeed.zero_stage == 3


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "d"}, "train": {"max_steps": 7},
                                    "optim": {"lr": 1}}))
    cfg = load_config(path, ["train.max_steps=9", "loss.types=[sigmoid, sft]", "loss.weights=[1, 1]",
                             "data.max_patches=null"])
    assert cfg.train.max_steps == 9 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.types == ["sigmoid", "sft"] and cfg.data.max_patches is None
    # YAML 1.1 reads 1e-6 as a string; a float field takes it as the number it is
    assert load_config(path, ["optim.lr=1e-6", "loss.beta=2E-1"]).optim.lr == 1e-6
    with pytest.raises(ValueError, match="optim.lr: expected float, got 'fast'"):
        load_config(path, ["optim.lr=fast"])


@pytest.mark.parametrize("item, match", [
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("nosuch.key=1", "unknown config section 'nosuch'"),
    ("train.max_steps=ten", "train.max_steps: expected int"),
    ("train.max_steps=true", "train.max_steps: expected int"),
    ("train.max_steps=-1", "train.max_steps: -1 is below the minimum 0"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: 4 is above the maximum 3"),
    ("data.packing=dense", "data.packing: 'dense' is not one of"),
    ("loss.types=[sigmoid, nope]", "unknown loss type"),
    ("loss.weights=[1.0]", "loss_weights has 1 entries"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.max_steps", "expected section.key=value"),
    ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
    ("loss.beta=.inf", "loss.beta: inf is not a finite number"),
    ("optim.max_grad_norm=.inf", "optim.max_grad_norm: inf is not a finite number"),
    ("loss.weights=[0.8, .nan, 1.0]", r"loss.weights\[1\]|loss.weights: nan"),
])
def test_bad_values_name_the_key(item, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, REQUIRED + [item])


def test_required_keys_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="model.path is required"):
        load_config(None, ["data.train=d"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  seed: 1\n  typo_key: 2\n")
    with pytest.raises(ValueError, match=rf"{bad.name}: unknown config key 'train.typo_key'"):
        load_config(bad, REQUIRED)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")


def test_help_lists_every_key_with_its_help():
    text = help_text()
    for key in ("train.max_steps", "train.seed", "train.global_batch_pairs", "train.max_tokens_per_row",
                "deepspeed.zero_stage", "checkpoint.every_steps", "loss.reference"):
        assert key in text
    assert "ZeRO stage" in text


@pytest.mark.parametrize("name", ["demo.yaml", "demo_warmup.yaml", "internvl2_8b_mpo.yaml", "zero3.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.path and cfg.data.train


def test_demo_configs_match_the_built_in_demo(monkeypatch, tmp_path):
    """configs/demo*.yaml are the built-in demo's two stages (paths aside)."""
    from mpo.train import demo

    monkeypatch.setattr(demo, "prepare", lambda root, arch: (tmp_path / "m", tmp_path / "d"))
    warm, mpo = demo.demo_configs(run_dir=str(tmp_path / "run"))
    for built, name in ((warm, "demo_warmup.yaml"), (mpo, "demo.yaml")):
        shipped = load_config(ROOT / "configs" / name).to_dict()
        mine = built.to_dict()
        for section in mine:
            for key, value in mine[section].items():
                if key not in ("path", "train", "eval", "output_dir"):
                    assert shipped[section][key] == value, f"{name}: {section}.{key}"


def test_weight_decay_groups_see_through_zero3_shards():
    from mpo.train.engine import param_groups

    lin = torch.nn.Linear(4, 3)
    shard = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves of a [3, 4] weight
    shard.ds_shape = torch.Size([3, 4])
    frozen = torch.nn.Parameter(torch.ones(2, 2), requires_grad=False)
    module = torch.nn.Module()
    module.lin, module.shard, module.frozen = lin, shard, frozen
    decay, no_decay = param_groups(module, 0.05)
    assert decay["weight_decay"] == 0.05 and {id(p) for p in decay["params"]} == {id(lin.weight), id(shard)}
    assert no_decay["weight_decay"] == 0.0 and [id(p) for p in no_decay["params"]] == [id(lin.bias)]


def test_param_groups_by_role_take_the_role_learning_rate():
    from mpo.train.engine import param_groups

    module = torch.nn.Module()
    module.tower, module.proj, module.lm = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    roles = {id(p): "vision" for p in module.tower.parameters()} | {id(module.proj.weight): "projector"}
    groups = param_groups(module, 0.1, roles, {"language": 1e-3, "vision": 1e-4, "projector": 2e-3})
    seen = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    assert seen == {(1e-3, 0.1): {id(module.lm.weight)}, (1e-3, 0.0): {id(module.lm.bias), id(module.proj.bias)},
                    (1e-4, 0.1): {id(module.tower.weight)}, (1e-4, 0.0): {id(module.tower.bias)},
                    (2e-3, 0.1): {id(module.proj.weight)}}
    assert groups[0]["lr"] == 1e-3  # the language model's group first: the rate metrics.jsonl logs


def test_deepspeed_json_may_not_change_what_the_trainer_derives(tmp_path):
    from mpo.train.engine import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": 1.0}))
    cfg = load_config(None, REQUIRED + ["deepspeed.zero_stage=3", f"deepspeed.config={path}"])
    merged = deepspeed_config(cfg, torch.bfloat16)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": True} and merged["bf16"] == {"enabled": True}
    cfg = load_config(None, REQUIRED + ["deepspeed.zero_stage=2", f"deepspeed.config={path}"])
    with pytest.raises(ValueError, match="sets zero_optimization.stage = 3, but this run derives it \\(2\\) from "
                                         "deepspeed.zero_stage"):
        deepspeed_config(cfg, torch.bfloat16)
    for bad, match in (({"zero_optimization": True}, "zero_optimization must be an object"),
                       ({"bf16": 1}, "bf16 must be an object"), ([1, 2], "must hold a JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            deepspeed_config(load_config(None, REQUIRED + [f"deepspeed.config={path}"]), torch.float32)
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="sets bf16.enabled = True.*from model.dtype"):
        deepspeed_config(load_config(None, REQUIRED + [f"deepspeed.config={path}"]), torch.float32)


@pytest.mark.parametrize("items, match", [
    (["model.load_in_4bit=true"], r"model.load_in_4bit \(QLoRA\).*set lora.r > 0"),
    (["model.load_in_4bit=true", "lora.r=8"], "deepspeed.zero_stage=0: ZeRO-3 cannot partition bitsandbytes'"),
    (["model.load_in_4bit=true", "lora.r=8", "deepspeed.zero_stage=2"], "needs deepspeed.zero_stage=0"),
    (["model.load_in_4bit=true", "lora.r=8", "deepspeed.zero_stage=0", "train.device=cpu"], "needs a CUDA device"),
    (["logging.report_to=[tensorboard, comet]"], r"logging.report_to: 'comet' is not one of"),
])
def test_qlora_and_reporter_settings_are_checked(items, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, REQUIRED + items)
    assert load_config(None, REQUIRED + ["model.load_in_4bit=true", "lora.r=8", "deepspeed.zero_stage=0"])


def test_4bit_without_cuda_or_bitsandbytes_is_refused_before_any_data_or_model_loads(tmp_path, monkeypatch):
    """The device is only known at start (train.device=auto): the trainer refuses there, before it
    creates the run folder, indexes the data or loads a model."""
    from mpo.distributed import Dist
    from mpo.train import trainer

    cfg = load_config(None, REQUIRED + ["model.load_in_4bit=true", "lora.r=8", "deepspeed.zero_stage=0"])
    monkeypatch.setattr(trainer, "init", lambda choice: Dist(0, 1, 0, torch.device("cpu")))
    monkeypatch.setattr(trainer.PairDataset, "open", lambda *a, **k: pytest.fail("the data was indexed"))
    with pytest.raises(ValueError, match="model.load_in_4bit: 4-bit .* need a CUDA device.*this run is on cpu"):
        trainer.Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # with CUDA but without the package: named, with how to install it
    monkeypatch.setattr(trainer, "init", lambda choice: Dist(0, 1, 0, torch.device("cuda", 0)))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else object())
    with pytest.raises(ImportError, match="needs the bitsandbytes package: pip install bitsandbytes"):
        trainer.Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_wandb_listed_but_not_installed_is_refused_at_start(tmp_path, monkeypatch):
    from mpo.distributed import Dist
    from mpo.train import trainer

    cfg = load_config(None, REQUIRED + ["logging.report_to=[wandb]"])
    monkeypatch.setattr(trainer, "init", lambda choice: Dist(0, 1, 0, torch.device("cpu")))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ImportError, match="pip install wandb"):
        trainer.Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("on, report_to", [(True, ["tensorboard"]), (False, [])])
def test_a_renamed_key_reads_as_its_new_form_with_a_notice(tmp_path, capsys, on, report_to):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "d"}, "logging": {"tensorboard": on}}))
    assert load_config(path).logging.report_to == report_to
    notices = capsys.readouterr().err.splitlines()
    assert notices == [f"mpo: {path}: config key logging.tensorboard is now logging.report_to; read "
                       f"logging.tensorboard: {str(on).lower()} as logging.report_to: [{', '.join(report_to)}]"]
    assert load_config(None, REQUIRED + [f"logging.tensorboard={str(on).lower()}"]).logging.report_to == report_to
    assert "override: config key logging.tensorboard is now logging.report_to" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"override: logging.tensorboard: expected bool, got 'sometimes'"):
        load_config(None, REQUIRED + ["logging.tensorboard=sometimes"])
    path.write_text(f"model: {{path: m}}\ndata: {{train: d}}\nlogging: {{tensorboard: {str(on).lower()}, "
                    "report_to: [wandb]}\n")
    with pytest.raises(ValueError, match="logging.tensorboard and logging.report_to name one key; keep "
                                         "logging.report_to"):
        load_config(path)


def test_a_run_an_older_version_started_resumes_unless_a_key_added_since_changes(tmp_path):
    """The older version wrote logging.tensorboard and knew no loss.sft_normalization: its run ran
    as that key's default does, so only a different value is a change of plan."""
    from mpo.train.trainer import _check_resumable

    old = load_config(None, REQUIRED).to_dict()
    del old["loss"]["sft_normalization"], old["logging"]["report_to"]
    old["logging"]["tensorboard"] = True
    ckpt = tmp_path / "run" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 3, "config": old}))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    _check_resumable(load_config(tmp_path / "run" / "config.yaml"), ckpt)
    _check_resumable(load_config(None, REQUIRED + ["logging.report_to=[]"]), ckpt)  # logging may change
    with pytest.raises(ValueError, match=r"differs from the one .*checkpoint-3 was trained with in "
                                         r"loss.sft_normalization;"):
        _check_resumable(load_config(tmp_path / "run" / "config.yaml", ["loss.sft_normalization=token"]), ckpt)
