"""The pair index: token counts from image headers equal full rendering, workers change nothing,
records read back by location, and a stale index or changed data is never used silently."""

import json
import os
import random
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from mpo.data.dataset import PairDataset
from mpo.data.formats import DataSource, read_pairs
from mpo.data.index import PairIndex, build_index, fingerprint, index_key, index_path
from mpo.data.packing import PackingOptions, fit_to_budget, pair_cost
from mpo.data.records import PreferencePair, Rejects
from mpo.data.render import Renderer
from mpo.errors import BadPair, DataError

RENDERING = {"packing": "prefix", "max_tokens": 4096, "overlong": "truncate", "max_patches": None,
             "min_pixels": None, "max_pixels": None, "max_image_pixels": 50_000_000}
OPTS = PackingOptions("prefix", 4096, "truncate")


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl", "qwen3_vl"])
def test_counted_tokens_equal_full_rendering_for_many_image_sizes(tmp_path, tiny_models, arch):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    renderer = Renderer(tiny_models[arch])
    for k in range(14):
        images = []
        for j in range(rng.choice([1, 1, 2, 3])):
            width, height = rng.choice([(rng.randint(8, 3000), rng.randint(8, 300)),  # wide strips
                                        (rng.randint(8, 300), rng.randint(8, 3000)),  # tall strips
                                        (rng.randint(100, 2000), rng.randint(100, 2000))])
            path = tmp_path / f"{k}-{j}.{rng.choice(['png', 'jpg'])}"
            Image.new("RGB", (width, height), (k * 17 % 255, 90, 200)).save(path)
            images.append(str(path))
        pair = PreferencePair(({"role": "user", "content": "<image>\n" * len(images) + "What is shown?"},),
                              "A picture.", "Nothing.", tuple(images), f"pair {k}",
                              rng.choice([None, 1, 2, 6, 12]))
        where = f"seed {seed}, pair {k}: {[Image.open(p).size for p in images]}, max_patches {pair.max_patches}"
        try:
            full = renderer.render(pair, k)
        except BadPair as bad:  # Qwen-VL refuses an aspect ratio over 200: so must the count
            assert bad.reason == "image_refused" and arch != "internvl", where
            with pytest.raises(BadPair, match="image_refused"):
                renderer.render(pair, k, pixels=False)
            continue
        counted = renderer.render(pair, k, pixels=False)
        assert counted.pixel_values is None, where
        assert counted.prompt_ids == full.prompt_ids, where
        assert counted.tiles == full.tiles == full.pixel_values.shape[0], where
        assert fingerprint(counted) == fingerprint(full), where


def write_messy_data(tmp_path, demo_data):
    """The demo annotations with bad records mixed in: malformed JSON, a missing field, a missing
    and a corrupt image, identical responses, a line that is not UTF-8."""
    meta = json.loads((demo_data / "meta.json").read_text())
    name, entry = next(iter(meta.items()))
    lines = (demo_data / entry["annotation"]).read_text().splitlines()[:12]
    good = json.loads(lines[0])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = ["{not json", json.dumps({k: v for k, v in good.items() if k != "chosen"}),
           json.dumps({**good, "image": "nope.png"}), json.dumps({**good, "image": str(tmp_path / "broken.png")}),
           json.dumps({**good, "rejected": good["chosen"]})]
    out = tmp_path / "messy.jsonl"
    with out.open("wb") as f:
        for i, line in enumerate(lines):
            f.write(line.encode() + b"\n")
            if i < len(bad):
                f.write(bad[i].encode() + b"\n")
        f.write(b'{"question": "\xff\xfe"}\n')
    root = (demo_data / entry.get("root", "")).resolve()
    for line in lines:  # images resolve against the annotation's folder
        for image in [json.loads(line)["image"]] if isinstance(json.loads(line)["image"], str) else []:
            target = tmp_path / image
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copy(root / image, target)
    return out


def test_index_matches_rendering_whatever_the_worker_count(tmp_path, tiny_models, demo_data):
    data = write_messy_data(tmp_path, demo_data)
    model = tiny_models["internvl"]
    key = index_key(model, data, RENDERING)
    built = {}
    for workers in (0, 2):
        rejects = Rejects(tmp_path / f"rejects{workers}.jsonl")
        built[workers] = build_index(DataSource(data), model, RENDERING, rejects, key, workers=workers)
        rejects.close()
    for name, array in built[0].arrays.items():
        assert np.array_equal(array, built[2].arrays[name]), name
    assert built[0].rejected == built[2].rejected
    listed = [(tmp_path / f"rejects{w}.jsonl").read_text().splitlines() for w in (0, 2)]
    assert sorted(listed[0]) == sorted(listed[1])

    # exactly what full rendering (pixels and all) finds: the same pairs, counts and rejects
    old, renderer, rendered = Rejects(), Renderer(model), {}
    located = list(DataSource(data).pairs(old))
    for i, (_, pair) in enumerate(located):
        try:
            rendered[i] = fit_to_budget(renderer.render(pair, i), "prefix", 4096, "truncate")
        except BadPair as bad:
            old.add(pair.source, bad)
    index = built[0]
    assert index.rejected == dict(old.counts) and set(old.counts) >= {"malformed_json", "missing_field",
                                                                      "missing_image", "corrupt_image",
                                                                      "identical_responses"}
    assert len(index) == len(located) and index.valid.tolist() == sorted(rendered)
    for i, pair in rendered.items():
        a = index.arrays
        assert (a["prompt"][i], a["chosen"][i], a["rejected"][i], a["tiles"][i], a["fingerprint"][i]) == \
            (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids), pair.tiles, fingerprint(pair)), i

    # records come back by location, rendered in full, and equal to reading in order
    dataset = PairDataset(DataSource(data), index, model, OPTS)
    for i in index.valid.tolist():
        assert fingerprint(dataset.render(i)) == fingerprint(rendered[i])
        assert dataset.render(i).pixel_values.equal(rendered[i].pixel_values)


def test_index_file_is_used_only_for_its_key(tmp_path, tiny_models, demo_data):
    model, data = tiny_models["internvl"], demo_data / "meta_heldout.json"
    key = index_key(model, data, RENDERING)
    index = build_index(DataSource(data), model, RENDERING, Rejects(), key)
    path = index_path(tmp_path, key)
    index.save(path)
    loaded = PairIndex.load(path, key)
    assert all(np.array_equal(loaded.arrays[k], v) for k, v in index.arrays.items())
    other = index_key(model, data, {**RENDERING, "max_tokens": 1024})
    assert index_path(tmp_path, other) != path and PairIndex.load(path, other) is None
    # 40 bytes a pair on disk and in memory
    assert sum(a.itemsize for a in index.arrays.values()) == 40


def test_formats_read_back_by_location(tmp_path, tiny_models, demo_data):
    """JSONL (byte offsets), Parquet (row groups) and saved datasets (rows): read back == read in order."""
    import datasets

    records = [{"prompt": f"Question {i}? " + "x" * (i % 7), "chosen": f"Yes {i}", "rejected": f"No {i}"}
               for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "d.parquet"), batch_size=7)  # several row groups
    table.save_to_disk(str(tmp_path / "saved"))
    for data in ("d.jsonl", "d.parquet", "saved"):
        source = DataSource(tmp_path / data)
        located = list(source.pairs(Rejects(strict=True)))
        assert [p for _, p in located] == list(read_pairs(tmp_path / data, Rejects(strict=True)))
        for where, pair in reversed(located):
            assert source.read(where) == pair, (data, where)


def test_a_changed_record_is_an_error_not_another_pair(tmp_path, tiny_models):
    model = tiny_models["qwen2"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                            for i in range(5)))
    index = build_index(DataSource(path), model, RENDERING, Rejects(), index_key(model, path, RENDERING))
    dataset = PairDataset(DataSource(path), index, model, OPTS)
    assert len(dataset[(0, 3)].pair_index) == 2
    path.write_text(path.read_text().replace("yes 3", "yes 3 and 4"))  # line 4 still starts where it did
    with pytest.raises(DataError, match=r"d\.jsonl:4: the pair renders differently"):
        dataset.render(3)
    path.write_text("short\n")
    with pytest.raises(DataError, match=r"d\.jsonl:4: the record no longer reads"):
        PairDataset(DataSource(path), index, model, OPTS).render(3)


def test_fit_to_budget_keeps_the_tile_count(tiny_models, demo_data):
    renderer = Renderer(tiny_models["internvl"])
    pair = next(read_pairs(demo_data / "meta.json", Rejects()))
    counted = renderer.render(pair, 0, pixels=False)
    cut = fit_to_budget(counted, "prefix", pair_cost(counted, "prefix") - 1, "truncate")
    assert cut is not counted and cut.tiles == counted.tiles > 0


MEMORY_DRIVER = """
import json, resource, sys
from mpo.data.dataset import PairDataset
from mpo.data.packing import PackingOptions
from mpo.data.records import Rejects
model, data = sys.argv[1], sys.argv[2]
pairs = PairDataset.open(model, data, PackingOptions("prefix", 4096, "truncate"), Rejects(), workers=2)
rows = pairs.data_order_rows()
print(json.dumps([len(pairs.valid), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_the_data(tmp_path, tiny_models):
    """Indexing 100k pairs and planning their rows takes under 100 MB more peak memory than 1k pairs:
    records are never held, only the index's fixed-size columns (`mpo.data.index.FIELDS`)."""
    import subprocess
    import sys

    peaks = {}
    for n in (1_000, 100_000):
        data = tmp_path / f"{n}.jsonl"
        with data.open("w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"What is {i} + {i % 97}? Think step by step and explain.",
                                    "chosen": f"It is {i + i % 97}, since adding {i % 97} to {i} gives that.",
                                    "rejected": f"It is {i + i % 97 + 1}."}) + "\n")
        proc = subprocess.run([sys.executable, "-c", MEMORY_DRIVER, str(tiny_models["qwen2"]), str(data)],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        valid, peaks[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert valid == n
    grown_mb = (peaks[100_000] - peaks[1_000]) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mb < 100, f"peak RSS grew {grown_mb:.0f} MB from 1k to 100k pairs"


def _rewrite(path, change) -> None:
    """The index file at `path` with `change(arrays)` applied, its metadata (and digest) kept."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), "np") as f:
        arrays, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(arrays)
    save_file(arrays, str(path), metadata)


def _zero_fingerprints(path, rng):
    def change(a):
        valid = np.flatnonzero(a["fingerprint"])
        a["fingerprint"][rng.sample(valid.tolist(), 2)] = 0
    _rewrite(path, change)


def _lower_token_counts(path, rng):
    def change(a):
        valid = a["fingerprint"] != 0
        a["chosen"][valid] //= 3
        a["rejected"][valid] //= 3
    _rewrite(path, change)


def _flip_a_byte(path, rng):
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    raw[rng.randrange(data_start, len(raw))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))


def _truncate(path, rng):
    raw = path.read_bytes()
    path.write_bytes(raw[:rng.randrange(1, len(raw))])


def _damage_the_header(path, rng):
    raw = bytearray(path.read_bytes())
    raw[8 + rng.randrange(4)] = 0xFF  # within the header's opening '{"__metadata__"'
    path.write_bytes(bytes(raw))


DAMAGE = {"zeroed fingerprints": _zero_fingerprints, "lowered token counts": _lower_token_counts,
          "a flipped byte": _flip_a_byte, "a truncated file": _truncate, "a damaged header": _damage_the_header}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_index_is_built_again_or_refused(tmp_path, tiny_models, demo_data, capsys, random_seed, damage):
    data, model = write_messy_data(tmp_path, demo_data), tiny_models["internvl"]
    fresh = PairDataset.open(model, data, OPTS, Rejects(), index_dir=tmp_path / "fresh").index
    [built] = (tmp_path / "fresh").glob("pairs-*.safetensors")
    path = tmp_path / "index" / built.name
    path.parent.mkdir()
    path.write_bytes(built.read_bytes())
    DAMAGE[damage](path, random.Random(random_seed))
    assert path.read_bytes() != built.read_bytes()
    capsys.readouterr()

    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: damaged pair index"):
        PairDataset.open(model, data, OPTS, Rejects(strict=True), index_dir=path.parent)
    assert PairIndex.load(path, fresh.key) is None
    assert capsys.readouterr().err.count(f"mpo: {path}: damaged pair index (") == 1

    rejects = Rejects()
    again = PairDataset.open(model, data, OPTS, rejects, index_dir=path.parent).index
    err = capsys.readouterr().err
    assert re.search(rf"^mpo: {re.escape(str(path))}: damaged pair index \(.+\); building it again$", err, re.M), err
    assert path.read_bytes() == built.read_bytes()
    assert all(np.array_equal(again.arrays[k], v) for k, v in fresh.arrays.items())
    assert again.rejected == fresh.rejected == dict(rejects.counts) and again.truncated == fresh.truncated
    assert PairIndex.load(path, fresh.key, strict=True) is not None and capsys.readouterr().err == ""


def test_an_index_no_build_writes_is_damaged_though_its_digest_matches(tmp_path, tiny_models, demo_data, capsys):
    data, model = write_messy_data(tmp_path, demo_data), tiny_models["internvl"]
    key = index_key(model, data, RENDERING)
    index = build_index(DataSource(data), model, RENDERING, Rejects(), key)
    path = index_path(tmp_path, key)
    first = int(index.valid[0])
    for change, why in [("chosen", f"pair {first} is over the 4096-token row budget"),
                        ("fingerprint", f"pair {first} has token counts but no fingerprint")]:
        arrays = {k: v.copy() for k, v in index.arrays.items()}
        arrays[change][first] = 4096 if change == "chosen" else 0
        PairIndex(arrays, key, index.rejected, index.truncated).save(path)
        with pytest.raises(ValueError, match=re.escape(f"{path}: damaged pair index ({why})")):
            PairIndex.load(path, key, strict=True)
        assert PairIndex.load(path, key) is None and why in capsys.readouterr().err


def test_a_missing_or_other_index_is_built_quietly(tmp_path, tiny_models, demo_data, capsys):
    model, data = tiny_models["qwen2"], tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                            for i in range(5)))
    key = index_key(model, data, RENDERING)
    path = index_path(tmp_path, key)
    assert PairIndex.load(path, key, strict=True) is None
    build_index(DataSource(data), model, RENDERING, Rejects(), key).save(path)
    other = index_key(model, data, {**RENDERING, "max_tokens": 1024})
    assert PairIndex.load(path, other, strict=True) is None and PairIndex.load(path, key, strict=True) is not None
    assert capsys.readouterr().err == ""
