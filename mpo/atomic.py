"""Files written whole or not at all: into a temporary name beside the target, then renamed.

A process killed mid-write leaves the old file (or none), never a half-written one. The temporary
name carries the process id, so ranks writing the same file do not step on each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """A safetensors file (tensors made contiguous) with string metadata. A failed write (full disk,
    file-size limit) is an OSError naming the file: safetensors' own error names none."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
