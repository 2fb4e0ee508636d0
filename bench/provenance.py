"""What a benchmark row records about where it ran: package versions and the git commit."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import torch


def versions(packages: tuple[str, ...]) -> str:
    out = [f"torch={torch.__version__}"]
    for pkg in packages:
        try:
            out.append(f"{pkg}={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return " ".join(out)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
