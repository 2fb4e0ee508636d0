"""The benches run end to end: bench_loss.py --cpu (table, long-format CSV, forward ops checked),
bench_train.py --cpu, bench_sp_images.py."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_bench_loss_cpu_smoke(tmp_path):
    out = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_loss.py"), "--cpu", "--csv", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    by = {(r["op"], r["impl"]): r for r in rows}
    for key in [("fwd_bwd", "mpo"), ("fwd", "mpo"), ("fwd_bwd", "eager"), ("fwd", "eager"),
                ("fwd_bwd", "cublas"), ("fwd", "cublas")]:
        r = by[key]
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"]), r
        assert r["git_sha"] and "torch=" in r["versions"]
    assert "max |sum err|" in by[("fwd", "mpo")]["note"]
    assert "max grad err" in by[("fwd_bwd", "mpo")]["note"] and "max grad err" in by[("fwd_bwd", "eager")]["note"]
    assert "WRONG" not in proc.stdout
    assert set(r["impl"] for r in rows) == {"mpo", "eager", "trl", "liger", "cce", "cce_exact", "cublas"}


def test_bench_train_cpu_smoke(tmp_path):
    """bench/bench_train.py --cpu: mpo trains SmolLM2 on text pairs and reports (TRL is not a test
    dependency; the online-reference mode is the trainer's, tested in tests/test_train.py)."""
    out = tmp_path / "train.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--cpu", "--impls", "mpo",
                           "--csv", str(out), "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    (row,) = csv.DictReader(out.open())
    assert row["impl"] == "mpo" and row["preset"] == "smollm2-135m"
    assert float(row["pairs_per_s"]) > 0 and int(row["steps_timed"]) == 2 and float(row["ref_pass_s"]) > 0


def test_bench_sp_images_smoke():
    """bench/bench_sp_images.py: both ways measured on 2 ranks; sharing 3 tiles keeps less a rank."""
    import json

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_sp_images.py"), "--tiles", "3", "--layers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    kept = {(r["way"], r["rank"]): r["activation_bytes"] for r in results}
    assert len(kept) == 4 and all(kept["shared", k] < kept["every rank", k] for k in (0, 1)), kept
