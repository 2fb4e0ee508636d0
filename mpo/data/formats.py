"""Preference data formats -> `PreferencePair`s, streamed, with bad records counted not lost.

- MMPR (the MPO paper's format): a meta JSON mapping dataset names to {"root", "annotation",
  "repeat_time", "max_dynamic_patch", ...}; each annotation line {"image": str | [str] | absent,
  "question", "chosen", "rejected"} with "<image>" placeholders (prepended, one per image, when a
  question has none). Relative annotation and root paths resolve against the meta file's folder,
  or else the working directory (the official MMPR meta uses the latter); image paths against
  root. repeat_time r: the file int(r) times, then a seeded random sample of floor(n * frac(r))
  of its n lines, kept in file order (InternVL samples too, rather than taking leading lines:
  MMPR files group the pairs of one question together). A bare annotation .jsonl also loads
  (root = its folder).
- TRL-style records {"prompt", "chosen", "rejected", optional "images" (or "image")}: plain strings, or chat
  messages (content as a string or a list of {"type": "text" | "image"} parts) with chosen and
  rejected as one assistant message each; from JSONL, Parquet, or a folder saved by `datasets`.
  Images: paths (relative to the file's folder), encoded bytes, {"bytes", "path"} dicts (the
  `datasets` Image feature) or PIL images.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

from mpo.data.records import IMAGE_TOKEN, BadPair, PreferencePair, Rejects, check_responses


def read_pairs(path: str | Path, rejects: Rejects, *, split: str = "train", seed: int = 0) -> Iterator[PreferencePair]:
    """Every valid pair of a data source, in data order; bad records go to `rejects`.
    seed: for MMPR's fractional repeat_time samples."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.is_dir():
        yield from _read_trl_rows(_dataset_rows(path, split), path, path, rejects)
    elif path.suffix == ".json":
        yield from _read_mmpr_meta(path, rejects, seed)
    elif path.suffix == ".jsonl":
        if _first_record_keys(path) & {"question"}:
            yield from _read_mmpr_annotation(path, path.parent, 1.0, None, rejects, 0)
        else:
            yield from _read_trl_rows(_jsonl_rows(path), path, path.parent, rejects)
    elif path.suffix == ".parquet":
        yield from _read_trl_rows(_parquet_rows(path), path, path.parent, rejects)
    else:
        raise ValueError(f"{path}: unknown data format (expected an MMPR meta .json, .jsonl, .parquet "
                         "or a folder saved by `datasets`)")


# --- MMPR -------------------------------------------------------------------------------------------------

def _resolve(meta_dir: Path, relative: str) -> Path:
    """Against the meta file's folder, else the working directory (where MMPR's own meta points)."""
    here = meta_dir / relative
    if here.exists() or not Path(relative).exists():
        return here
    return Path(relative)


def _read_mmpr_meta(path: Path, rejects: Rejects, seed: int) -> Iterator[PreferencePair]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed meta JSON: {e.msg}") from e
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: an MMPR meta file maps dataset names to their entries")
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise ValueError(f"{where}: needs an 'annotation' path")
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or not repeat > 0:
            raise ValueError(f"{where}: repeat_time must be a number > 0, got {repeat!r}")
        max_patches = entry.get("max_dynamic_patch")
        if max_patches is not None and (not isinstance(max_patches, int) or max_patches < 1):
            raise ValueError(f"{where}: max_dynamic_patch must be an integer >= 1, got {max_patches!r}")
        annotation = _resolve(path.parent, entry["annotation"])
        root = _resolve(path.parent, entry.get("root", ""))
        if not annotation.is_file():
            raise FileNotFoundError(f"{where}: annotation file not found: {path.parent / entry['annotation']}")
        yield from _read_mmpr_annotation(annotation, root, float(repeat), max_patches, rejects,
                                         f"{seed}:{name}")


def _passes(path: Path, repeat: float, seed) -> Iterator[set | None]:
    """Per pass over the file, the line numbers to keep (None = all): int(repeat) full passes,
    then a seeded sample of floor(n * repeat) - n * int(repeat) lines."""
    whole = int(repeat)
    yield from [None] * whole
    if repeat != whole:
        n, last = 0, b"\n"
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                n, last = n + chunk.count(b"\n"), chunk[-1:]
        n += last != b"\n"  # a last line without its newline
        k = math.floor(n * repeat + 1e-9) - n * whole  # repeat - whole is inexact in binary
        yield set(random.Random(f"mpo-repeat:{seed}").sample(range(1, n + 1), k))


def _read_mmpr_annotation(path: Path, root: Path, repeat: float, max_patches: int | None,
                          rejects: Rejects, seed) -> Iterator[PreferencePair]:
    for keep in _passes(path, repeat, seed):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if keep is not None and line_no not in keep:
                    continue
                if not line.strip():
                    continue
                source = f"{path}:{line_no}"
                try:
                    yield _mmpr_pair(_parse_object(line), root, source, max_patches)
                except BadPair as bad:
                    rejects.add(source, bad, line.rstrip("\n"))


def _mmpr_pair(obj: dict, root: Path, source: str, max_patches: int | None) -> PreferencePair:
    question, chosen, rejected = (_text_field(obj, k) for k in ("question", "chosen", "rejected"))
    image = obj.get("image")
    if image is None:
        names = []
    elif isinstance(image, str):
        names = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        names = image
    else:
        raise BadPair("bad_field", "image must be a string or a list of strings")
    images = tuple(str(_existing_image(root / name)) for name in names)
    question = with_placeholders(question, len(images))
    check_responses(chosen, rejected)
    return PreferencePair(({"role": "user", "content": question},), chosen, rejected, images, source,
                          max_patches)


# --- TRL-style --------------------------------------------------------------------------------------------

def _read_trl_rows(rows: Iterator[tuple[str, object]], path: Path, base: Path,
                   rejects: Rejects) -> Iterator[PreferencePair]:
    for where, row in rows:
        source = f"{path}:{where}"
        try:
            obj = _parse_object(row) if isinstance(row, str) else row
            yield _trl_pair(obj, base, source)
        except BadPair as bad:
            rejects.add(source, bad, row if isinstance(row, str) else _json_or_repr(row))


def _trl_pair(obj: dict, base: Path, source: str) -> PreferencePair:
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj or obj[key] is None:
            raise BadPair("missing_field", key)
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = [_message(m) for m in prompt]
    else:
        raise BadPair("bad_field", "prompt must be a string or a non-empty list of messages")
    chosen, rejected = _response(obj["chosen"], "chosen"), _response(obj["rejected"], "rejected")
    if obj.get("images") is not None and obj.get("image") is not None:
        raise BadPair("bad_field", "both 'image' and 'images' are given")
    raw_images = obj.get("images") if obj.get("images") is not None else obj.get("image") or []
    if not isinstance(raw_images, list):
        raw_images = [raw_images]  # a single image
    images = tuple(_image_ref(x, base) for x in raw_images)
    if images and not any(IMAGE_TOKEN in m["content"] for m in messages):
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
        messages[first_user] = {**messages[first_user],
                                "content": with_placeholders(messages[first_user]["content"], len(images))}
    found = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if found != len(images):
        raise BadPair("image_mismatch", f"{found} placeholders for {len(images)} images")
    check_responses(chosen, rejected)
    return PreferencePair(tuple(messages), chosen, rejected, images, source)


def _message(m) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
        raise BadPair("bad_field", "a message needs a string 'role' and a 'content'")
    content = m["content"]
    if isinstance(content, str):
        return {"role": m["role"], "content": content}
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image":
                parts.append(IMAGE_TOKEN)
            else:
                raise BadPair("bad_field", f"unknown message part {part!r:.80}")
        return {"role": m["role"], "content": "".join(parts)}
    raise BadPair("bad_field", "message content must be a string or a list of parts")


def _response(value, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1:
        message = _message(value[0])
        if message["role"] == "assistant" and IMAGE_TOKEN not in message["content"]:
            return message["content"]
    raise BadPair("bad_field", f"{key} must be a string or one assistant message")


def _image_ref(x, base: Path):
    if isinstance(x, dict):  # the `datasets` Image feature, undecoded
        x = x.get("bytes") or x.get("path")
    if isinstance(x, str):
        return str(_existing_image(base / x))
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
        return x
    raise BadPair("bad_field", f"unusable image entry of type {type(x).__name__}")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield str(line_no), line.rstrip("\n")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: pip install 'mpo[data]'") from e
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record


def _dataset_rows(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a saved dataset folder needs `datasets`: pip install 'mpo[data]'") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    for i, record in enumerate(ds, 1):
        yield f"row {i}", record


# --- shared -----------------------------------------------------------------------------------------------

def _parse_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadPair("malformed_json", e.msg) from None
    if not isinstance(obj, dict):
        raise BadPair("malformed_json", f"expected an object, got {type(obj).__name__}")
    return obj


def _text_field(obj: dict, key: str) -> str:
    if key not in obj or obj[key] is None:
        raise BadPair("missing_field", key)
    if not isinstance(obj[key], str):
        raise BadPair("bad_field", f"{key} must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def with_placeholders(text: str, n_images: int) -> str:
    """One IMAGE_TOKEN per image: prepended when the text has none (as MMPR does), else checked."""
    found = text.count(IMAGE_TOKEN)
    if n_images and not found:
        return f"{IMAGE_TOKEN}\n" * n_images + text
    if found != n_images:
        raise BadPair("image_mismatch", f"{found} {IMAGE_TOKEN} placeholders for {n_images} images")
    return text


def _existing_image(path: Path) -> Path:
    if not path.is_file():
        raise BadPair("missing_image", str(path))
    return path


def _first_record_keys(path: Path) -> set:
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return set(obj)
    return set()


def _json_or_repr(row) -> str:
    try:
        return json.dumps(row, ensure_ascii=False, default=lambda o: f"<{type(o).__name__}>")
    except (TypeError, ValueError):
        return repr(row)
