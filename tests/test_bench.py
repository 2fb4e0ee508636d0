"""bench/bench_loss.py --cpu runs end to end: table, long-format CSV, forward ops checked."""

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
    """bench/bench_train.py --cpu: both mpo modes train SmolLM2 on text pairs and report (TRL is not a
    test dependency)."""
    out = tmp_path / "train.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--cpu", "--impls", "mpo,mpo-online",
                           "--csv", str(out), "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = {r["impl"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"mpo", "mpo-online"}
    for r in rows.values():
        assert float(r["pairs_per_s"]) > 0 and int(r["steps_timed"]) == 2 and r["preset"] == "smollm2-135m"
    assert float(rows["mpo"]["ref_pass_s"]) > 0 and rows["mpo-online"]["ref_pass_s"] == ""
