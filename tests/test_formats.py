"""Reading preference data: MMPR meta/annotations and TRL-style JSONL, Parquet and datasets folders."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mpo.data.formats import DataSource, read_pairs
from mpo.data.records import Rejects
from mpo.errors import DataError


def png(path, color=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def mmpr(tmp_path, records, **entry):
    write_jsonl(tmp_path / "ann" / "a.jsonl", records)
    meta = {"set_a": {"root": "imgs", "annotation": "ann/a.jsonl", "repeat_time": 1, **entry}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "meta.json"


def pair(**kw):
    return {"question": "What is shown?", "chosen": "A square.", "rejected": "A circle.", **kw}


def test_mmpr_images_as_string_list_or_absent(tmp_path):
    png(tmp_path / "imgs" / "x.png")
    png(tmp_path / "imgs" / "sub" / "y.png")
    meta = mmpr(tmp_path, [pair(image="x.png"), pair(image=["x.png", "sub/y.png"]), pair(),
                           pair(image="x.png", question="Look: <image> what?")], max_dynamic_patch=3)
    pairs = list(read_pairs(meta, Rejects(strict=True)))
    assert [len(p.images) for p in pairs] == [1, 2, 0, 1]
    assert pairs[0].prompt[0]["content"] == "<image>\nWhat is shown?"  # prepended when missing
    assert pairs[1].prompt[0]["content"].startswith("<image>\n<image>\n")
    assert pairs[3].prompt[0]["content"] == "Look: <image> what?"  # kept where it is
    assert pairs[1].images[1] == str(tmp_path / "imgs" / "sub" / "y.png")
    assert all(p.max_patches == 3 for p in pairs)
    assert pairs[2].source.endswith("a.jsonl:3")


@pytest.mark.parametrize("repeat, expected", [(0.5, 10), (1, 20), (2, 40), (2.4, 48)])
def test_mmpr_repeat_time(tmp_path, repeat, expected):
    records = [pair(chosen=f"answer {i}") for i in range(20)]
    meta = mmpr(tmp_path, records, repeat_time=repeat)
    got = [p.chosen for p in read_pairs(meta, Rejects(strict=True))]
    assert len(got) == expected
    whole = int(repeat)
    assert got[:20 * whole] == [f"answer {i}" for i in range(20)] * whole
    sample = got[20 * whole:]
    assert len(set(sample)) == len(sample) and sample == sorted(sample, key=lambda a: int(a.split()[1]))
    if sample:  # a seeded sample, not the leading lines; the same on every read, another for another seed
        assert sample != [f"answer {i}" for i in range(len(sample))]
        assert sample == [p.chosen for p in read_pairs(meta, Rejects(strict=True))][20 * whole:]
        assert sample != [p.chosen for p in read_pairs(meta, Rejects(strict=True), seed=1)][20 * whole:]


def test_mmpr_meta_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    png(tmp_path / "MMPR" / "images" / "x.png")
    write_jsonl(tmp_path / "MMPR" / "annotations" / "a.jsonl", [pair(image="x.png")])
    meta = {"a": {"root": "MMPR/images", "annotation": "MMPR/annotations/a.jsonl"}}
    (tmp_path / "MMPR" / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    (p,) = read_pairs(tmp_path / "MMPR" / "meta.json", Rejects(strict=True))
    assert Path(p.images[0]).resolve() == (tmp_path / "MMPR" / "images" / "x.png").resolve()


def test_bare_annotation_file(tmp_path):
    png(tmp_path / "z.png")
    path = write_jsonl(tmp_path / "ann.jsonl", [pair(image="z.png")])
    (p,) = read_pairs(path, Rejects(strict=True))
    assert p.images == (str(tmp_path / "z.png"),)


def test_trl_jsonl_strings_and_messages(tmp_path):
    png(tmp_path / "i.png")
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
         "chosen": [{"role": "assistant", "content": "Red."}],
         "rejected": [{"role": "assistant", "content": "Blue."}], "images": ["i.png"]},
        {"prompt": "Describe.", "chosen": "Red.", "rejected": "Blue.", "images": ["i.png"]},
        {"prompt": "Describe.", "chosen": "Red.", "rejected": "Blue.", "image": "i.png"},
    ])
    a, b, c, d = read_pairs(path, Rejects(strict=True))
    assert d.images == c.images
    assert a.prompt == ({"role": "user", "content": "Say hi."},) and a.chosen == "Hi!"
    assert b.prompt[0]["role"] == "system" and b.prompt[1]["content"] == "<image>Colour?"
    assert b.chosen == "Red." and b.images == (str(tmp_path / "i.png"),)
    assert c.prompt[0]["content"] == "<image>\nDescribe."


def test_trl_parquet_with_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="PNG")
    table = pa.table({"prompt": ["Q1", "Q2"], "chosen": ["good", "fine"], "rejected": ["bad", "poor"],
                      "images": [[{"bytes": buf.getvalue(), "path": None}], []]})
    pq.write_table(table, tmp_path / "d.parquet")
    a, b = read_pairs(tmp_path / "d.parquet", Rejects(strict=True))
    assert isinstance(a.images[0], bytes) and b.images == ()
    assert a.source.endswith("d.parquet:row 1")


def test_trl_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["Q"], "chosen": ["yes"], "rejected": ["no"]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    (p,) = read_pairs(tmp_path / "saved", Rejects(strict=True))
    assert p.chosen == "yes"
    with pytest.raises(ValueError, match="no split"):
        list(read_pairs(tmp_path / "saved", Rejects(), split="test"))


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown data format"):
        list(read_pairs(tmp_path / "x.csv", Rejects()))
    with pytest.raises(FileNotFoundError):
        list(read_pairs(tmp_path / "nope.json", Rejects()))


@pytest.mark.parametrize("meta, match", [
    ("{not json", "malformed meta JSON"),
    ('{"a": {"root": "x"}}', "annotation"),
    ('{"a": {"annotation": "a.jsonl", "repeat_time": 0}}', "repeat_time"),
    ('{"a": {"annotation": "a.jsonl", "repeat_time": 1e999}}', "repeat_time must be a finite number"),
    ('{"a": {"annotation": "a.jsonl", "repeat_time": NaN}}', "repeat_time must be a finite number"),
    ('{"a": {"annotation": "missing.jsonl"}}', "not found"),
])
def test_bad_meta_files(tmp_path, meta, match):
    (tmp_path / "a.jsonl").write_text(json.dumps(pair()) + "\n")
    (tmp_path / "meta.json").write_text(meta)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        list(read_pairs(tmp_path / "meta.json", Rejects()))


BAD_RECORDS = {
    "malformed_json": '{"question": "q", "chosen": ',
    "missing_field": pair(chosen=None),
    "bad_field": pair(rejected=["a list"]),
    "empty_response": pair(chosen="   "),
    "identical_responses": pair(rejected="A square."),
    "image_mismatch": pair(image="ok.png", question="<image> and <image>?"),
    "missing_image": pair(image="absent.png"),
}
# more lines that are rejected, not fatal: reason -> raw line
BAD_LINES = {
    "malformed_json": '[' * 100_000 + ']' * 100_000,  # nested past the parser's recursion limit
}


def test_each_bad_record_is_skipped_counted_and_listed(tmp_path):
    png(tmp_path / "imgs" / "ok.png")
    records = [pair(image="ok.png")] + list(BAD_RECORDS.values()) + [pair()]
    meta = mmpr(tmp_path, records)
    rejects = Rejects(tmp_path / "rejects.jsonl")
    good = list(read_pairs(meta, rejects))
    rejects.close()
    assert len(good) == 2
    assert dict(rejects.counts) == {reason: 1 for reason in BAD_RECORDS}
    listed = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in listed] == list(BAD_RECORDS)
    assert listed[0]["source"].endswith("a.jsonl:2") and listed[0]["record"] == BAD_RECORDS["malformed_json"]


@pytest.mark.parametrize("reason", list(BAD_RECORDS))
def test_strict_stops_at_the_first_bad_record_with_its_location(tmp_path, reason):
    png(tmp_path / "imgs" / "ok.png")
    meta = mmpr(tmp_path, [pair(), BAD_RECORDS[reason], pair()])
    with pytest.raises(DataError, match=rf"a\.jsonl:2: {reason}"):
        list(read_pairs(meta, Rejects(strict=True)))


def test_lines_that_crash_parsers_are_rejects(tmp_path):
    """Deep nesting and bytes that are not UTF-8 are counted rejects naming their line; the
    good records around them are all kept; a role outside system/user/assistant is rejected."""
    png(tmp_path / "imgs" / "ok.png")
    meta = mmpr(tmp_path, [pair(), BAD_LINES["malformed_json"], pair()])
    with (tmp_path / "ann" / "a.jsonl").open("ab") as f:
        f.write(b'{"question": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
        f.write((json.dumps(pair()) + "\n").encode())
    rejects = Rejects(tmp_path / "rejects.jsonl")
    good = list(read_pairs(meta, rejects))
    rejects.close()
    assert len(good) == 3 and dict(rejects.counts) == {"malformed_json": 2}
    listed = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[1] for r in listed] == ["2", "4"]
    assert "nested too deeply" in listed[0]["detail"] and "not UTF-8" in listed[1]["detail"]
    trl = tmp_path / "t.jsonl"
    trl.write_text(json.dumps({"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: bad_field: message role 'tool' is not one of"):
        list(read_pairs(trl, Rejects(strict=True)))


def test_image_paths_may_not_leave_their_root(tmp_path):
    """Absolute paths, .. and symlinks that lead outside the dataset's root are rejects, unless
    allowed; a symlink that stays inside is fine."""
    png(tmp_path / "imgs" / "ok.png")
    secret = png(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "imgs" / "escape.png").symlink_to(secret)
    (tmp_path / "imgs" / "inside.png").symlink_to(tmp_path / "imgs" / "ok.png")
    records = [pair(image="ok.png"), pair(image=str(secret)), pair(image="../elsewhere/secret.png"),
               pair(image="escape.png"), pair(image="inside.png")]
    meta = mmpr(tmp_path, records)
    rejects = Rejects()
    kept = list(read_pairs(meta, rejects))
    assert len(kept) == 2 and dict(rejects.counts) == {"image_outside_root": 3}
    allowed = list(DataSource(meta, allow_outside_root=True).pairs(Rejects(strict=True)))
    assert len(allowed) == 5
    trl = tmp_path / "t" / "d.jsonl"
    write_jsonl(trl, [{"prompt": "What?", "chosen": "a", "rejected": "b", "images": ["../imgs/ok.png"]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: image_outside_root"):
        list(read_pairs(trl, Rejects(strict=True)))
    write_jsonl(trl, [{"prompt": "What?", "chosen": "a", "rejected": "b", "images": ["imgs/ok.png"]}])
    (p,) = DataSource(trl, image_root=tmp_path).pairs(Rejects(strict=True))  # data.image_root moves the root
    assert p[1].images == (str(tmp_path / "imgs/ok.png"),)
