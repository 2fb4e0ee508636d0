"""Four ranks (gloo, CPU): the pair index they build together is the one-rank index byte for byte,
and a failure on any one rank during index building, reference preparation or export ends every
rank promptly with that rank's message."""

import json
import re
import sys
import time
from pathlib import Path

import pytest
from commands import on_own, write_config
from test_index import write_messy_data

from mpo.data.dataset import PairDataset
from mpo.data.packing import PackingOptions
from mpo.data.records import Rejects

pytestmark = pytest.mark.slow
RANKS = 4
# Rank 0 serves the store the ranks meet through (it waits for the others to read a failure before
# it may end); any other rank is like every other: the first and the last are the two cases.
FAILING = (0, RANKS - 1)
DRIVER = Path(__file__).with_name("ranks_driver.py")


def on_ranks(*args, timeout=300):
    """Run the driver on RANKS processes, each on its own (`on_own`).
    -> ([exit status per rank], [output per rank], the time the last one ended)."""
    procs = on_own([sys.executable, str(DRIVER), *map(str, args)], RANKS)
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs, time.time()


def ended_by(fail: int, status: list[int], outputs: list[str], ended: float) -> None:
    """Every rank ended, non-zero, within a minute of the failure, with the failing rank's message."""
    message = f"injected failure on rank {fail}"
    everything = "\n".join(f"--- rank {r}:\n{out[-3000:]}" for r, out in enumerate(outputs))
    assert all(s != 0 for s in status), everything
    assert all(message in out for out in outputs), everything
    failed_at = float(re.search(r"failing at ([\d.]+)", outputs[fail])[1])
    assert ended - failed_at < 60, ended - failed_at


def test_four_ranks_build_the_one_rank_index_byte_for_byte(tmp_path, tiny_models, demo_data):
    data, model = write_messy_data(tmp_path, demo_data), tiny_models["internvl"]
    alone = tmp_path / "alone"
    rejects = Rejects(alone / "rejects.jsonl")
    PairDataset.open(model, data, PackingOptions("prefix", 4096, "truncate"), rejects, index_dir=alone)
    rejects.close()
    together = tmp_path / "together"
    together.mkdir()
    status, outputs, _ = on_ranks("index", -1, together, model, data)
    assert status == [0] * RANKS, outputs
    [one] = alone.glob("pairs-*.safetensors")
    assert [p.name for p in together.iterdir() if p.name != "rejects.jsonl"] == [one.name]  # no part left behind
    assert (together / one.name).read_bytes() == one.read_bytes()
    listed = (together / "rejects.jsonl").read_text()
    assert listed == (alone / "rejects.jsonl").read_text() and listed.count("\n") >= 6


@pytest.mark.parametrize("fail", FAILING)
def test_a_failure_while_indexing_ends_every_rank(tmp_path, tiny_models, demo_data, fail):
    data = write_messy_data(tmp_path, demo_data)
    ended_by(fail, *on_ranks("index", fail, tmp_path, tiny_models["internvl"], data))
    assert not [p for p in tmp_path.glob("pairs-*.safetensors") if ".part-" not in p.name]


@pytest.mark.parametrize("fail", FAILING)
def test_a_failure_while_preparing_the_reference_ends_every_rank(tmp_path, tiny_models, demo_data, fail):
    """Under ZeRO-3 the other ranks are then inside the reference forward's parameter gathers."""
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, data={"eval": ""})
    ended_by(fail, *on_ranks("mpo", fail, "mpo.train.reference:ReferenceModel.sums", "ref-logps", config,
                             "--output-dir", tmp_path / "run"))
    assert not (tmp_path / "run" / "reference_logps.safetensors").exists()


@pytest.mark.parametrize("fail", FAILING)
def test_a_failure_while_exporting_ends_every_rank(tmp_path, tiny_models, demo_data, fail):
    """The other ranks are then inside the export's ZeRO-3 parameter gathers (every parameter
    partitioned: the tiny model's would all stay whole on every rank by default)."""
    partitioned = tmp_path / "ds.json"
    partitioned.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, data={"eval": ""},
                          train={"max_steps": 1, "global_batch_pairs": 4},
                          loss={"impl": "torch", "types": ["sft"], "weights": [1.0]},
                          deepspeed={"config": str(partitioned)})
    ended_by(fail, *on_ranks("mpo", fail, "mpo.train.export:plan_export", "train", config,
                             "--output-dir", tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint-1").is_dir() and not (tmp_path / "run" / "final").exists()
