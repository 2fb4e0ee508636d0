"""Run metrics reported to Weights & Biases (a stand-in `wandb` module records the calls): the
resolved config once, the metrics.jsonl rows under the same names and steps, rank 0 only, and a
resumed run continuing the same W&B run."""

import json
import sys
import types

import pytest
import torch

from mpo.train.config import load_config
from mpo.train.metrics import MetricsLog

NAMES = ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/chosen", "rewards/accuracies", "lr",
         "step_s", "data_wait_s")


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def wandb_calls(monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def run_log(run_dir, *, main, start_step=0, steps=(1, 2, 3)):
    config = load_config(None, ["model.path=m", "data.train=d.jsonl", "logging.report_to=[wandb]"]).to_dict()
    log = MetricsLog(run_dir, main=main, total_steps=max(steps), start_step=start_step, report_to=["wandb"],
                     progress=False, config=config, wandb_project="")
    values = torch.randn(len(steps), len(NAMES)).tolist()
    for step, row in zip(steps, values):
        log.log(step, "train", dict(zip(NAMES, row)))
    log.log(steps[-1], "eval", {"loss": values[-1][0], "pairs": 9})
    log.close()
    return config


def test_wandb_gets_the_config_once_and_the_metrics_rows(tmp_path, wandb_calls):
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    config = run_log(run_dir, main=True)
    inits = [c for c in wandb_calls if c[0] == "init"]
    assert len(inits) == 1
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert inits[0][1] == {"project": "mpo", "name": "my-run", "dir": str(run_dir), "config": config,
                           "resume": "allow", "id": run_id}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [c for c in wandb_calls if c[0] == "log"]
    assert len(logged) == len(rows) == 4
    for (_, data, step), row in zip(logged, rows):
        assert step == row["step"]
        assert set(data) == {f"{row['split']}/{k}" for k in row if k not in ("step", "split", "time")}
        assert all(data[f"{row['split']}/{k}"] == row[k] for k in row if k not in ("step", "split", "time"))
    assert wandb_calls[-1] == ("finish",) and wandb_calls.count(("finish",)) == 1


def test_only_rank_0_reports(tmp_path, wandb_calls):
    run_log(tmp_path, main=False)
    assert wandb_calls == [] and not (tmp_path / "wandb_id").exists()


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_calls):
    first, other = tmp_path / "run", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    run_log(first, main=True, steps=(1, 2))
    run_log(first, main=True, start_step=2, steps=(3, 4))
    run_log(other, main=True)
    ids = [c[1]["id"] for c in wandb_calls if c[0] == "init"]
    assert ids[0] == ids[1] != ids[2]
    assert [c[2] for c in wandb_calls if c[0] == "log"][3:6] == [3, 4, 4]  # after the resume: its own steps


def test_a_missing_tensorboard_is_said_once_and_skipped(monkeypatch, capsys):
    import importlib.util

    from mpo.train.metrics import reporters

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb")
                        else real(name, *a))
    assert reporters(["tensorboard"], main=True) == []
    assert "names tensorboard, which is not installed" in capsys.readouterr().err
    assert reporters(["tensorboard"], main=False) == [] and not capsys.readouterr().err
    with pytest.raises(ImportError, match="names wandb, which is not installed"):
        reporters(["tensorboard", "wandb"], main=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert reporters(["tensorboard", "wandb"], main=True) == ["tensorboard", "wandb"]
