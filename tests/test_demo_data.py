"""The demo preference set: deterministic, well-formed, with ground truth behind every pair."""

import filecmp
import json
import re

import pytest

from mpo.data.demo import TASKS, write_demo_data
from mpo.data.formats import read_pairs
from mpo.data.records import Rejects


def test_deterministic_byte_for_byte(tmp_path):
    a = write_demo_data(tmp_path / "a", train=12, heldout=6, seed=3)
    b = write_demo_data(tmp_path / "b", train=12, heldout=6, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 6 + 18  # metas, annotations, images
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    c = write_demo_data(tmp_path / "c", train=12, heldout=6, seed=4)
    assert ((a / "annotations" / "count_train.jsonl").read_text()
            != (c / "annotations" / "count_train.jsonl").read_text())


def test_pairs_are_well_formed(demo_data):
    meta = json.loads((demo_data / "meta.json").read_text())
    assert set(meta) == {f"demo_{t}" for t in TASKS} and sum(e["length"] for e in meta.values()) == 27
    pairs = list(read_pairs(demo_data / "meta.json", Rejects(strict=True)))
    heldout = list(read_pairs(demo_data / "meta_heldout.json", Rejects(strict=True)))
    assert len(pairs) == 27 and len(heldout) == 9
    for task in TASKS:
        for line in (demo_data / "annotations" / f"{task}_train.jsonl").read_text().splitlines():
            rec = json.loads(line)
            final = lambda text: re.search(r"Final answer: (\S+)$", text).group(1)
            assert final(rec["chosen"]) == rec["answer"] != final(rec["rejected"])
            assert (demo_data / rec["image"]).is_file()


def test_refuses_to_overwrite_without_force(tmp_path):
    out = write_demo_data(tmp_path / "d", train=3, heldout=3)
    with pytest.raises(FileExistsError, match="--force"):
        write_demo_data(out, train=3, heldout=3)
    write_demo_data(out, train=6, heldout=3, force=True)
    other = tmp_path / "work"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo set"):
        write_demo_data(other, force=True)
    assert (other / "notes.txt").read_text() == "mine"
    assert json.loads((out / "meta.json").read_text())["demo_count"]["length"] == 2
    assert not list(tmp_path.glob(".d.tmp-*"))
