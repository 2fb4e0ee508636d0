"""Nested training state (optimizer, scheduler, RNG) <-> safetensors + JSON, never pickle.

`split_state` walks dicts, lists, tuples, tensors and scalars: tensors go to a flat
{path: tensor} dict for safetensors, the structure (with int dict keys, tuples and non-finite
floats preserved) to JSON. An object it cannot serialise (DeepSpeed's loss scaler) is recorded by
type only and, on load, taken from the live state at the same path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mpo.atomic import save_atomic


def split_state(obj, tensors: dict, path: str = "s"):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()  # clone: no storage shared across entries
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, split_state(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [split_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return {"__object__": type(obj).__name__}


def join_state(tree, tensors: dict, live=None):
    if isinstance(tree, list):
        return [join_state(v, tensors, _at(live, i)) for i, v in enumerate(tree)]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__dict__" in tree:
        return {k: join_state(v, tensors, _at(live, k)) for k, v in tree["__dict__"]}
    if "__tuple__" in tree:
        return tuple(join_state(v, tensors, _at(live, i)) for i, v in enumerate(tree["__tuple__"]))
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__object__" in tree:
        if live is None:
            raise ValueError(f"checkpoint holds a {tree['__object__']} object that cannot be restored")
        return live
    raise ValueError(f"unreadable checkpoint state entry {tree!r:.80}")


def _at(live, key):
    try:
        return live[key] if live is not None else None
    except (KeyError, IndexError, TypeError):
        return None


def save_state(obj, stem: Path) -> None:
    """Write stem.safetensors (tensors) and stem.json (structure)."""
    tensors: dict = {}
    tree = split_state(obj, tensors)
    save_atomic(tensors, _file(stem, ".safetensors"))
    _file(stem, ".json").write_text(json.dumps(tree))


def read_tensors(path: Path) -> dict:
    """A safetensors file's tensors; a damaged one (its header, its length) is a ValueError naming the
    file: safetensors' own error names none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def load_state(stem: Path, live=None):
    tensors_file, tree_file = _file(stem, ".safetensors"), _file(stem, ".json")
    tensors = read_tensors(tensors_file)
    try:
        tree = json.loads(tree_file.read_text())
    except ValueError as e:
        raise ValueError(f"{tree_file}: unreadable ({e})") from None
    try:
        return join_state(tree, tensors, live)
    except KeyError as e:  # a damaged header can rename a tensor and still parse
        raise ValueError(f"{tensors_file}: lacks the tensor {e} that {tree_file.name} lists") from None
    except ValueError as e:
        raise ValueError(f"{tree_file}: {e}") from None


def _file(stem: Path, suffix: str) -> Path:
    # appended, not with_suffix: stems like "optimizer.rank1" carry a dot of their own
    return stem.parent / (stem.name + suffix)
