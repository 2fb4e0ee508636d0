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

Data files are opened only when they are regular files (symlinks followed): a FIFO would block the
open and a device (/dev/zero) would read without end. A line longer than MAX_LINE_BYTES is a bad
record, read past in chunks, never held whole: images are files, not inline text.
"""

from __future__ import annotations

import json
import math
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mpo.data.records import IMAGE_TOKEN, PreferencePair, Rejects, check_responses
from mpo.errors import BadPair, DataError

MAX_LINE_BYTES = 64 << 20
MAX_REPEAT = 1000  # repeat_time: far above MMPR's own (at most a few), far below a read that never ends


@dataclass(frozen=True)
class Source:
    """One file records are read from, and how its records become pairs."""
    kind: str  # "mmpr" (an MMPR annotation file), "jsonl", "parquet" or "dataset" (TRL-style records)
    path: Path
    root: Path  # images resolve against it
    repeat: float = 1.0
    max_patches: int | None = None
    sample_seed: str = ""
    allow_outside: bool = False  # images may resolve outside root


@dataclass(frozen=True)
class Location:
    """Where a pair's record is: the source's number, the line's byte offset (a file of lines) or
    the row's number (Parquet, datasets), and the line or row number reported in messages."""
    source: int
    offset: int
    line: int


class DataSource:
    """A data source's files (found from the path alone, without reading records), its pairs in
    data order with their locations, and a record read back from its location."""

    def __init__(self, path: str | Path, *, split: str = "train", seed: int = 0, image_root: str | Path | None = None,
                 allow_outside_root: bool = False):
        """image_root: where TRL-style records' relative image paths resolve (default: the data
        file's folder; MMPR names its roots). Images must resolve (symlinks followed) under their
        root unless allow_outside_root."""
        self.path, self.split = Path(path), split
        self.options = {"split": split, "seed": seed, "image_root": str(image_root) if image_root else None,
                        "allow_outside_root": allow_outside_root}
        if not self.path.exists():
            raise FileNotFoundError(f"preference data not found: {self.path}")
        outside = allow_outside_root
        base = Path(image_root) if image_root else None
        if not self.path.is_dir():
            check_regular_file(self.path)
        if self.path.is_dir():
            self.sources = [Source("dataset", self.path, base or self.path, allow_outside=outside)]
        elif self.path.suffix == ".json":
            self.sources = _mmpr_meta_sources(self.path, seed, outside)
        elif self.path.suffix == ".jsonl":
            mmpr = bool(_first_record_keys(self.path) & {"question"})
            self.sources = [Source("mmpr" if mmpr else "jsonl", self.path, base or self.path.parent,
                                   allow_outside=outside)]
        elif self.path.suffix == ".parquet":
            self.sources = [Source("parquet", self.path, base or self.path.parent, allow_outside=outside)]
        else:
            raise ValueError(f"{self.path}: unknown data format (expected an MMPR meta .json, .jsonl, "
                             ".parquet or a folder saved by `datasets`)")
        self._open: dict = {}  # per process: open files, datasets, the last Parquet row group read

    def __getstate__(self):  # worker processes open their own files
        return {**self.__dict__, "_open": {}}

    def pairs(self, rejects: Rejects) -> Iterator[tuple[Location, PreferencePair]]:
        """Every valid pair with its location, in data order; bad records go to `rejects`."""
        for number, src in enumerate(self.sources):
            for offset, line, raw in self._rows(src):
                where = Location(number, offset, line)
                try:
                    if isinstance(raw, BadPair):
                        raise raw
                    yield where, self._pair(src, where, raw)
                except BadPair as bad:
                    text = raw.decode("utf-8", "replace").rstrip("\r\n") if isinstance(raw, bytes) else None
                    shown = None if raw is bad else text or _json_or_repr(raw)
                    rejects.add(self._source_name(src, line), bad, shown)

    def read(self, where: Location) -> PreferencePair:
        """The pair at `where` (it was valid when located; a file changed since is an error)."""
        src = self.sources[where.source]
        try:
            if src.kind in ("mmpr", "jsonl"):
                raw = _line_at(self._cached(src.path, lambda: os.open(src.path, os.O_RDONLY)), where.offset)
            elif src.kind == "parquet":
                raw = self._parquet_row(src.path, where.offset)
            else:
                raw = self._cached(src.path, lambda: _load_dataset(src.path, self.split))[where.offset]
            return self._pair(src, where, raw)
        except (BadPair, IndexError, OSError) as e:
            raise DataError(f"{self._source_name(src, where.line)}: the record no longer reads as it did "
                            f"when the data was indexed ({e}); the data changed: index it again") from None

    def _pair(self, src: Source, where: Location, raw) -> PreferencePair:
        name = self._source_name(src, where.line)
        obj = _parse_object(_decode(raw)) if isinstance(raw, bytes) else raw
        if src.kind == "mmpr":
            return _mmpr_pair(obj, src, name)
        return _trl_pair(obj, src, name)

    @staticmethod
    def _source_name(src: Source, line: int) -> str:
        return f"{src.path}:{line}" if src.kind in ("mmpr", "jsonl") else f"{src.path}:row {line}"

    def _rows(self, src: Source) -> Iterator[tuple[int, int, object]]:
        """(offset, line or row number, the line's bytes, the row's dict, or the BadPair of a line
        too long to read) of a source, in order."""
        if src.kind in ("mmpr", "jsonl"):
            for keep in _passes(src.path, src.repeat, src.sample_seed):
                yield from file_lines(src.path, keep)
        else:
            parquet = src.kind == "parquet"
            rows = _parquet_records(src.path) if parquet else _load_dataset(src.path, self.split)
            yield from ((row - 1, row, record) for row, record in enumerate(rows, 1))

    def _cached(self, key, make):
        if self._open.get("pid") != os.getpid():  # a forked worker must not share file offsets
            self._open = {"pid": os.getpid()}
        if key not in self._open:
            self._open[key] = make()
        return self._open[key]

    def _parquet_row(self, path: Path, row: int) -> dict:
        import bisect

        f = self._cached(path, lambda: _parquet_file(path))
        starts = self._cached((path, "starts"), lambda: _row_group_starts(f))
        group = bisect.bisect_right(starts, row) - 1
        cached = self._open.get((path, "group"))
        if cached is None or cached[0] != group:
            cached = self._open[(path, "group")] = (group, f.read_row_group(group).to_pylist())
        return cached[1][row - starts[group]]


def read_pairs(path: str | Path, rejects: Rejects, *, split: str = "train",
               seed: int = 0) -> Iterator[PreferencePair]:
    """Every valid pair of a data source, in data order; bad records go to `rejects`.
    seed: for MMPR's fractional repeat_time samples."""
    for _, pair in DataSource(path, split=split, seed=seed).pairs(rejects):
        yield pair


ROLES = ("system", "user", "assistant")

# --- MMPR -------------------------------------------------------------------------------------------------

def _resolve(meta_dir: Path, relative: str) -> Path:
    """Against the meta file's folder, else the working directory (where MMPR's own meta points)."""
    here = meta_dir / relative
    if here.exists() or not Path(relative).exists():
        return here
    return Path(relative)


def check_regular_file(path: Path) -> None:
    """FileNotFoundError or ValueError unless `path` is a regular file (symlinks followed), checked
    before any open: opening a FIFO blocks until a writer comes, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, device or socket); data is read from files only")


def _mmpr_meta_sources(path: Path, seed: int, allow_outside: bool) -> list[Source]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed meta JSON: {e.msg}") from e
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: an MMPR meta file maps dataset names to their entries")
    sources = []
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise ValueError(f"{where}: needs an 'annotation' path")
        repeat = entry.get("repeat_time", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not 0 < repeat <= MAX_REPEAT:
            raise ValueError(f"{where}: repeat_time must be a finite number > 0 and at most {MAX_REPEAT} (the times "
                             f"the annotation file is read), got {repeat!r}")
        max_patches = entry.get("max_dynamic_patch")
        if max_patches is not None and (not isinstance(max_patches, int) or max_patches < 1):
            raise ValueError(f"{where}: max_dynamic_patch must be an integer >= 1, got {max_patches!r}")
        annotation = _resolve(path.parent, entry["annotation"])
        root = _resolve(path.parent, entry.get("root", ""))
        if not annotation.exists():
            missing = path.parent / entry["annotation"]
            raise FileNotFoundError(f"{where}: annotation file not found: {missing}")
        try:
            check_regular_file(annotation)
        except ValueError as e:
            raise ValueError(f"{where}: annotation {e}") from None
        sources.append(Source("mmpr", annotation, root, float(repeat), max_patches, f"{seed}:{name}", allow_outside))
    return sources


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


def file_lines(path: Path, keep: set | None = None) -> Iterator[tuple[int, int, bytes | BadPair]]:
    """(byte offset, line number, bytes) of the non-blank lines of a regular file (only those in
    `keep`); a line longer than MAX_LINE_BYTES comes as the BadPair saying so, its bytes skipped."""
    offset, line_no = 0, 0
    with path.open("rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):
            line_no += 1
            start, offset = offset, offset + len(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while not raw.endswith(b"\n") and (raw := f.readline(1 << 20)):
                    offset += len(raw)
                if keep is None or line_no in keep:
                    yield start, line_no, BadPair("malformed_json", f"the line is longer than {MAX_LINE_BYTES >> 20} "
                                                                    "MiB (images belong in files)")
            elif (keep is None or line_no in keep) and raw.strip():
                yield start, line_no, raw


def _line_at(fd: int, offset: int) -> bytes:
    """The line starting at `offset` (positioned reads: no buffer that could hold stale bytes, no
    file position shared with forked workers)."""
    parts, size = [], 0
    while size <= MAX_LINE_BYTES:
        chunk = os.pread(fd, 1 << 16, offset)
        end = chunk.find(b"\n")
        if end >= 0 or not chunk:
            parts.append(chunk if end < 0 else chunk[:end + 1])
            return b"".join(parts)
        parts.append(chunk)
        offset, size = offset + len(chunk), size + len(chunk)
    raise BadPair("malformed_json", f"the line is longer than {MAX_LINE_BYTES >> 20} MiB")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadPair("malformed_json", f"not UTF-8 at byte {e.start}") from None


def _mmpr_pair(obj: dict, src: Source, source: str) -> PreferencePair:
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
    images = tuple(str(_image_path(src, name)) for name in names)
    question = with_placeholders(question, len(images))
    check_responses(chosen, rejected)
    return PreferencePair(({"role": "user", "content": question},), chosen, rejected, images, source,
                          src.max_patches)


# --- TRL-style --------------------------------------------------------------------------------------------

def _trl_pair(obj: dict, src: Source, source: str) -> PreferencePair:
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
    images = tuple(_image_ref(x, src) for x in raw_images)
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
    if m["role"] not in ROLES:
        raise BadPair("bad_field", f"message role {m['role']!r:.40} is not one of {', '.join(ROLES)}")
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


def _image_ref(x, src: Source):
    if isinstance(x, dict):  # the `datasets` Image feature, undecoded
        x = x.get("bytes") or x.get("path")
    if isinstance(x, str):
        return str(_image_path(src, x))
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
        return x
    raise BadPair("bad_field", f"unusable image entry of type {type(x).__name__}")


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: pip install 'mpo[data]'") from e
    return pq.ParquetFile(path)


def _row_group_starts(f) -> list[int]:
    starts = [0]
    for g in range(f.metadata.num_row_groups):
        starts.append(starts[-1] + f.metadata.row_group(g).num_rows)
    return starts


def _parquet_records(path: Path) -> Iterator[dict]:
    for batch in _parquet_file(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _load_dataset(path: Path, split: str):
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a saved dataset folder needs `datasets`: pip install 'mpo[data]'") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds


# --- shared -----------------------------------------------------------------------------------------------

def _parse_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadPair("malformed_json", e.msg) from None
    except RecursionError:
        raise BadPair("malformed_json", "nested too deeply") from None
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


def _image_path(src: Source, name: str) -> Path:
    """An image file named by a record: it must exist and, unless the source allows otherwise,
    resolve (symlinks followed) under the source's root: a record may not reach other files."""
    path = src.root / name
    if not path.is_file():
        raise BadPair("missing_image", str(path))
    if not src.allow_outside and not path.resolve().is_relative_to(src.root.resolve()):
        raise BadPair("image_outside_root", f"{name} resolves to {path.resolve()}, outside {src.root}")
    return path


def _first_record_keys(path: Path) -> set:
    for _, _, line in file_lines(path):
        try:
            obj = json.loads(line) if isinstance(line, bytes) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            return set(obj)
    return set()


def _json_or_repr(row) -> str:
    try:
        return json.dumps(row, ensure_ascii=False, default=lambda o: f"<{type(o).__name__}>")
    except (TypeError, ValueError):
        return repr(row)
