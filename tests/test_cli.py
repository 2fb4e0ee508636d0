"""The `mpo` entry points."""

import subprocess
import sys

import mpo
from mpo.cli import main


def test_help_and_version(capsys):
    assert main([]) == 2
    assert "usage: mpo" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "mpo", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"mpo {mpo.__version__}"


def test_env_reports_the_dispatch(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "path" in out

