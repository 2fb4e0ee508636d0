"""Every kernel compiles for Hopper (sm_90) and Ampere (sm_80) with the configs a GPU would use.

The interpreter accepts programs the compiler rejects (dtype mismatches in dot, bad layouts), so
the CPU tier also compiles the real kernels with Triton's bundled ptxas, launch-faithfully
specialised, and requires 16-bit kernels not to spill (bench/kernel_resources.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cc", [90, 80])
def test_kernels_compile_without_spills(cc):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_resources.py"), "--cc", str(cc),
         "--dtype", "bf16", "--dtype", "fp16", "--dtype", "fp32", "--D", "4096", "--V", "92553"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    for kernel in ("lse_partials", "lse_merge", "logits_grad", "grad_matmul", "mpo_pair_loss"):
        assert kernel in table, f"{kernel} was never launched:\n{table}"
    if cc == 90:
        wgmma = [line for line in table.splitlines() if "lse_partials" in line and "bf16" in line]
        assert wgmma and all(line.split("|")[7].strip() == "True" for line in wgmma), table
