"""The data commands end to end: tiny-model, demo-data, data check/stats, logps."""

import json

import pytest
import torch
from safetensors import safe_open

from mpo.cli import main
from mpo.data.formats import read_pairs
from mpo.data.packing import pack_row
from mpo.data.records import Rejects
from mpo.data.render import Renderer
from mpo.models.loading import load_model, pair_logps


def test_tiny_model_and_demo_data_commands(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m"), "--arch", "llama"]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    assert main(["demo-data", str(tmp_path / "d"), "--train", "6", "--heldout", "3"]) == 0
    assert main(["demo-data", str(tmp_path / "d")]) == 1
    assert "--force" in capsys.readouterr().err


def test_data_check_json_and_strict(tiny_models, demo_data, tmp_path, capsys):
    args = ["data", "check", "--model", str(tiny_models["internvl"]), "--data"]
    assert main(args + [str(demo_data / "meta.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"valid": 27, "rejected": {}}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "chosen": "a", "rejected": "b"}) + "\n{oops\n"
                   + json.dumps({"question": "q", "chosen": "a", "rejected": "a"}) + "\n")
    assert main(args + [str(bad), "--json", "--output-dir", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out) == {"valid": 1, "rejected": {"malformed_json": 1,
                                                                            "identical_responses": 1}}
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 2
    assert main(args + [str(bad), "--strict"]) == 1
    assert f"{bad}:2: malformed_json" in capsys.readouterr().err


def test_data_stats(tiny_models, demo_data, capsys):
    assert main(["data", "stats", "--model", str(tiny_models["internvl"]), "--data", str(demo_data / "meta.json"),
                 "--max-tokens", "1024", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["pairs"] == 27 and s["image_tiles"] == 27 * 5  # 112 x 112 -> 2 x 2 + thumbnail
    t = s["tokens"]
    assert s["packing"]["plain"]["row_tokens"] - s["packing"]["prefix"]["row_tokens"] == s["prefix_saves_tokens"]
    assert s["prefix_saves_tokens"] == t["prompt"] - 27  # one prompt copy minus its shared last token
    assert 0.5 < s["packing"]["prefix"]["efficiency"] <= 1


@pytest.mark.parametrize("arch, packing", [("internvl", "prefix"), ("internvl", "plain"), ("qwen2_5_vl", "prefix")])
def test_logps_command_writes_data_order_sums(tiny_models, demo_data, tmp_path, arch, packing, capsys):
    out = tmp_path / "ref.safetensors"
    assert main(["logps", "--model", str(tiny_models[arch]), "--data", str(demo_data / "meta_heldout.json"),
                 "--packing", packing, "--max-tokens", "600", "--out", str(out)]) == 0
    assert "9/9 pairs" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert t["chosen_logps"].dtype == torch.float32 and t["valid"].all() and t["chosen_tokens"].dtype == torch.int64
    assert (t["fingerprint"] != 0).all() and t["fingerprint"].unique().numel() == 9
    assert json.loads(meta["rendering"])["packing"] == packing and meta["pairs"] == "9"
    assert not list(tmp_path.glob(".*tmp*"))
    # each pair on its own equals the packed run, in data order
    renderer, model = Renderer(tiny_models[arch]), load_model(tiny_models[arch])
    for i, pair in enumerate(read_pairs(demo_data / "meta_heldout.json", Rejects())):
        with torch.no_grad():
            sums, counts = pair_logps(model, pack_row([renderer.render(pair, i)], "plain", renderer.family.positions))
        assert t["chosen_logps"][i].item() == pytest.approx(sums[0].item(), rel=1e-5)
        assert t["rejected_logps"][i].item() == pytest.approx(sums[1].item(), rel=1e-5)
        assert t["rejected_tokens"][i] == counts[1]


def test_logps_marks_skipped_pairs(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": "q", "chosen": c, "rejected": "no"}) + "\n"
                            for c in ("yes", "yes " * 200, "maybe")))
    out = tmp_path / "o.safetensors"
    assert main(["logps", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--max-tokens", "100",
                 "--overlong", "drop", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        valid, chosen = f.get_tensor("valid"), f.get_tensor("chosen_logps")
    assert valid.tolist() == [True, False, True] and torch.isnan(chosen[1]) and not torch.isnan(chosen[0])
    with safe_open(str(out), "pt") as f:
        assert (f.get_tensor("fingerprint") != 0).tolist() == [True, False, True]
    assert "too_long" in (tmp_path / "o.safetensors.rejects.jsonl").read_text()


def test_missing_model_folder_is_a_clear_error(demo_data, tmp_path, capsys):
    assert main(["logps", "--model", str(tmp_path / "none"), "--data", str(demo_data / "meta.json"),
                 "--out", str(tmp_path / "o.safetensors")]) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_logps_under_a_launcher_is_refused_before_any_work(tiny_models, demo_data, tmp_path, capsys, monkeypatch):
    """Every rank would run the whole pass and write the same file: the many-rank pass is mpo ref-logps."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    out = tmp_path / "o.safetensors"
    assert main(["logps", "--model", str(tiny_models["qwen2"]), "--data", str(demo_data / "meta.json"),
                 "--out", str(out)]) == 1
    said = capsys.readouterr().err
    assert "one of 8 (WORLD_SIZE)" in said and "mpo ref-logps CONFIG" in said, said
    assert not out.exists() and not out.with_name(out.name + ".rejects.jsonl").exists()
