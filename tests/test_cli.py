"""The `mpo` entry points."""

import os
import subprocess
import sys

import torch

import mpo
from mpo.cli import main


def test_help_and_version(capsys):
    assert main([]) == 2
    assert "usage: mpo" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "mpo", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"mpo {mpo.__version__}"


def test_env_reports_the_dispatch(capsys):
    """The path `env` names is the one linear_logprobs takes: the kernels under the interpreter (as
    in this process: tests/conftest.py sets TRITON_INTERPRET=1), PyTorch on CPU tensors without it."""
    from mpo.logprobs import resolve_impl

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"torch {torch.__version__}" in out
    assert f"linear_logprobs on {device} tensors runs the {resolve_impl('auto', torch.device(device))} path" in out
    if device == "cpu":
        assert "linear_logprobs on cpu tensors runs the triton path" in out and "TRITON_INTERPRET=1" in out
        plain = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "mpo", "env"], capture_output=True, text=True, env=plain)
        assert proc.returncode == 0, proc.stderr
        assert "linear_logprobs on cpu tensors runs the torch path" in proc.stdout
        assert "TRITON_INTERPRET" not in proc.stdout

