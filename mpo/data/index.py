"""The pair index: where each pair's record is and what it costs, built once, kept on disk.

One pass over a data source reads every record, renders its text with the model's tokenizer and
counts its image tiles from the image headers (`Renderer.render(pixels=False)`: no pixel is
decoded), applies the over-long policy and keeps, per pair, in data order:

  source, offset, line     int32, int64, int32   where the record is (`formats.Location`)
  prompt, chosen, rejected int32                 token counts after the over-long policy
  tiles                    int32                 image tiles (Qwen-VL: patches)
  fingerprint              int64                 a hash of the rendered token ids; 0: rejected

40 bytes a pair; records are read back by location when a row is packed, so nothing else of the
data stays in memory. Pairs are numbered in data order as the readers yield them (records
rejected while reading get no number); a pair rejected while rendering keeps its number with
fingerprint 0, so per-pair outputs (reference log-probs) stay aligned with the data.

The file is keyed by the data files' contents, the tokenizer and processor files and the
rendering options, and named by a hash of that key, so any number of indexes share a folder and
every command finds the one it can use. Its metadata holds a digest of its contents, checked when
it is read, as is what no build writes (a pair over the row budget, counts without a fingerprint):
a damaged index is built again, or refused in strict mode, never trusted. Workers render in
parallel (`workers` processes, in chunks, a bounded number in flight); rejected records are
counted and listed in data order whatever the worker count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mpo.atomic import save_atomic
from mpo.data.formats import DataSource, Location, _resolve
from mpo.data.packing import fit_to_budget
from mpo.data.records import Rejects
from mpo.data.render import ImageOptions, RenderedPair, Renderer
from mpo.errors import BadPair, DataError

FIELDS = {"source": "i", "offset": "q", "line": "i", "prompt": "i", "chosen": "i", "rejected": "i",
          "tiles": "i", "fingerprint": "q"}
MEASURED = ("prompt", "chosen", "rejected", "tiles", "fingerprint")
CHUNK = 256  # pairs a worker renders per task
# what rendering a pair depends on besides the data and the processing files
RENDERING = ("packing", "max_tokens", "overlong", "max_patches", "min_pixels", "max_pixels", "max_image_pixels")
PROCESSING_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def fingerprint(pair: RenderedPair) -> int:
    """63-bit hash of a rendered pair's token ids (prompt, chosen, rejected); never 0."""
    h = hashlib.blake2b(digest_size=8)
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return (int.from_bytes(h.digest(), "little") >> 1) or 1


# --- keys ---------------------------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(paths: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(paths):
        h.update(f"{p.name}:{file_digest(p)};".encode())
    return h.hexdigest()


def data_files(path: Path) -> list[Path]:
    """The files a data source is read from (MMPR meta + annotations, or the file / folder).
    Images are not hashed (there may be millions): a changed image under an unchanged path goes
    unnoticed."""
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    if path.suffix == ".json":
        meta = json.loads(path.read_text())
        return [path] + [_resolve(path.parent, entry["annotation"]) for entry in meta.values()]
    return [path]


def rendering_options(opts, images: ImageOptions) -> dict:
    """The RENDERING options: PackingOptions' and the ImageOptions."""
    return {"packing": opts.layout, "max_tokens": opts.max_tokens, "overlong": opts.overlong, **asdict(images)}


def image_options(rendering: dict) -> ImageOptions:
    return ImageOptions(**{f.name: rendering[f.name] for f in fields(ImageOptions)})


def index_key(model: str | Path, data: str | Path | DataSource, rendering: dict) -> dict:
    """What the index depends on: the data files and how they are read, the tokenizer and
    processor files (not the weights) and the rendering options."""
    source = data if isinstance(data, DataSource) else DataSource(data)
    missing = set(RENDERING) - set(rendering)
    assert not missing, missing
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    files = [p for p in Path(model).iterdir() if p.is_file() and p.suffix in PROCESSING_SUFFIXES]
    return {"data": tree_digest(data_files(source.path)), "reading": source.options, "processing": tree_digest(files),
            "rendering": {k: rendering[k] for k in RENDERING}}


def index_path(folder: str | Path, key: dict) -> Path:
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return Path(folder) / f"pairs-{name}.safetensors"


# --- the index ----------------------------------------------------------------------------------------------

@dataclass
class PairIndex:
    arrays: dict[str, np.ndarray]  # FIELDS, one entry per numbered pair
    key: dict
    rejected: dict[str, int]  # records skipped, by reason
    truncated: int  # pairs whose responses the over-long policy cut

    def __len__(self) -> int:
        return len(self.arrays["fingerprint"])

    def __post_init__(self):
        a = self.arrays
        self.valid = np.flatnonzero(a["fingerprint"] != 0)
        self.chosen = a["chosen"]
        if not len(self.valid):
            raise ValueError(f"no valid preference pairs (rejected: {self.rejected or 'none'})")

    def cost(self, layout: str) -> np.ndarray:
        """Row tokens of every pair in `layout` (see packing.pair_cost)."""
        a = self.arrays
        body = a["chosen"].astype(np.int64) + a["rejected"]
        return body + a["prompt"] - 1 if layout == "prefix" else body + 2 * a["prompt"].astype(np.int64) - 2

    def location(self, i: int) -> Location:
        a = self.arrays
        return Location(int(a["source"][i]), int(a["offset"][i]), int(a["line"][i]))

    def save(self, path: Path) -> None:
        # one metadata entry: safetensors writes several in no fixed order, and the same index
        # should be the same bytes
        about = {"key": self.key, "rejected": self.rejected, "truncated": self.truncated}
        about["digest"] = _digest(self.arrays, about)
        save_atomic({k: torch.from_numpy(v) for k, v in self.arrays.items()}, path,
                    {"index": json.dumps(about, sort_keys=True)})

    @classmethod
    def load(cls, path: Path, key: dict, *, strict: bool = False) -> PairIndex | None:
        """The index at `path` when it was built from this data the same way, else None (build it).
        A damaged one (unreadable, its contents not what was saved, or not what a build writes) is
        None with a notice on stderr, or a ValueError naming it when `strict`."""
        from safetensors import SafetensorError

        if not path.is_file():
            return None
        try:
            return cls._read(path, key)
        except (SafetensorError, OSError, ValueError) as e:  # a JSONDecodeError is a ValueError
            why = str(e).splitlines()[0]
        if strict:
            raise ValueError(f"{path}: damaged pair index ({why}); delete it to build it again") from None
        print(f"mpo: {path}: damaged pair index ({why}); building it again", file=sys.stderr)
        return None

    @classmethod
    def _read(cls, path: Path, key: dict) -> PairIndex | None:
        """The index at `path`, None when it is another key's; ValueError saying why when damaged."""
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            about = json.loads((f.metadata() or {}).get("index", "null"))
            if not isinstance(about, dict):
                raise ValueError("no index metadata")
            if json.dumps(about.get("key"), sort_keys=True) != json.dumps(key, sort_keys=True):
                return None
            if "digest" not in about:  # written before indexes carried one: stale, not damaged
                return None
            if set(f.keys()) != set(FIELDS):
                raise ValueError(f"arrays {sorted(f.keys())}, not {sorted(FIELDS)}")
            arrays = {k: f.get_tensor(k) for k in FIELDS}
        for name, code in FIELDS.items():
            if arrays[name].dtype != np.dtype(code) or arrays[name].ndim != 1:
                raise ValueError(f"array {name} is {arrays[name].dtype} {list(arrays[name].shape)}, "
                                 f"not a {np.dtype(code)} column")
        if len({len(a) for a in arrays.values()}) != 1:
            raise ValueError("arrays of unequal lengths")
        if not isinstance(about.get("rejected"), dict) or not isinstance(about.get("truncated"), int):
            raise ValueError("no reject counts in its metadata")
        if _digest(arrays, about) != about["digest"]:
            raise ValueError("contents differ from their digest")
        index = cls(arrays, key, about["rejected"], about["truncated"])  # no valid pair: a ValueError
        index._check_buildable()
        return index

    def _check_buildable(self) -> None:
        """ValueError for what no build writes: a matching digest vouches only for whoever wrote last."""
        a, rendering = self.arrays, self.key["rendering"]
        gone = a["fingerprint"] == 0
        over = np.flatnonzero(~gone & (self.cost(rendering["packing"]) > rendering["max_tokens"]))
        if len(over):
            raise ValueError(f"pair {over[0]} is over the {rendering['max_tokens']}-token row budget")
        counts = np.stack([a[name] for name in MEASURED[:-1]])
        if (counts < 0).any():
            raise ValueError("negative token or tile counts")
        odd = np.flatnonzero(gone & counts.any(axis=0))
        if len(odd):
            raise ValueError(f"pair {odd[0]} has token counts but no fingerprint")
        if int(gone.sum()) > sum(self.rejected.values()):
            raise ValueError(f"{int(gone.sum())} pairs marked rejected, {sum(self.rejected.values())} rejects listed")


def _digest(arrays: dict[str, np.ndarray], about: dict) -> str:
    """blake2b of the arrays' bytes in FIELDS order and the metadata beside them."""
    h = hashlib.blake2b(digest_size=16)
    for name in FIELDS:
        h.update(f"{name}:".encode())
        h.update(np.ascontiguousarray(arrays[name]))
    h.update(json.dumps({k: v for k, v in about.items() if k != "digest"}, sort_keys=True).encode())
    return h.hexdigest()


# --- building it --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _renderer(model_dir: str, rendering: str) -> Renderer:
    """The renderer of this process (a measuring worker keeps one for all its chunks)."""
    return Renderer(model_dir, image_options(json.loads(rendering)))


def _measure(model_dir: str, rendering: str, chunk: list[tuple[int, object]]) -> list[tuple]:
    """Per pair: (prompt, chosen, rejected, tiles, fingerprint, truncated) or (reason, detail);
    `rendering`: the rendering options as JSON."""
    renderer, r = _renderer(model_dir, rendering), json.loads(rendering)
    out = []
    for number, pair in chunk:
        try:
            rendered = renderer.render(pair, number, pixels=False)
            fitted = fit_to_budget(rendered, r["packing"], r["max_tokens"], r["overlong"])
        except BadPair as bad:
            out.append((bad.reason, bad.detail))
            continue
        out.append((len(fitted.prompt_ids), len(fitted.chosen_ids), len(fitted.rejected_ids), fitted.tiles,
                    fingerprint(fitted), fitted is not rendered))
    return out


@dataclass
class IndexPart:
    """What one of `world` builders measured. Every builder reads the whole record stream (so all
    number the pairs alike) and renders only its chunks of CHUNK pairs (chunk c: builder c % world):
    the renders, image headers and tokenizer work, which are the cost, are shared; reading records
    is not. `locations` and the records rejected while reading (`rejected` entries with kind 0)
    are the whole stream's; the measured rows and the rendering rejects (kind 1) its chunks'."""

    numbers: np.ndarray  # int64: the pairs measured here
    measured: dict[str, np.ndarray]  # MEASURED fields and "truncated", aligned with numbers
    rejected: list  # [pair number, kind, source, reason, detail, record]: data order sorts them
    locations: dict[str, np.ndarray]  # source, offset, line of every pair

    def save(self, path: Path) -> None:
        """The part for the builder that merges (locations are its own: not written)."""
        mine = [r for r in self.rejected if r[1] == 1]
        save_atomic({"numbers": torch.from_numpy(self.numbers),
                     **{k: torch.from_numpy(v) for k, v in self.measured.items()}}, path,
                    {"rejected": json.dumps(mine)})

    @classmethod
    def load(cls, path: Path) -> IndexPart:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            rejected = json.loads((f.metadata() or {})["rejected"])
        return cls(arrays.pop("numbers"), arrays, rejected, {})


def part_path(index_file: Path, rank: int, world: int) -> Path:
    return index_file.with_name(f"{index_file.stem}.part-{rank}-of-{world}.safetensors")


class _Reading:
    """Rejects of the reading pass, kept with their place in data order (the pairs read before)."""

    def __init__(self, strict: bool, columns: dict):
        self.strict, self.columns, self.found = strict, columns, []

    def add(self, source: str, bad: BadPair, raw: str | None = None) -> None:
        if self.strict:
            raise DataError(f"{source}: {bad}")
        self.found.append([len(self.columns["line"]), 0, source, bad.reason, bad.detail, raw])


def measure(source: DataSource, model_dir: str | Path, rendering: dict, *, shard: tuple[int, int] = (0, 1),
            strict: bool = False, workers: int = 0, progress=None) -> IndexPart:
    """Builder `rank` of `world` (shard): read every record of `source`, measure the pairs of its
    chunks (in `workers` processes; 0: in this one)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    rank, world = shard
    where = {name: array(FIELDS[name]) for name in ("source", "offset", "line")}
    columns = {name: array(FIELDS[name]) for name in MEASURED} | {"truncated": array("b"), "numbers": array("q")}
    reading = _Reading(strict, where)
    rejected = reading.found
    sources: dict[int, str] = {}  # pair number -> "file:line", only while its chunk is in flight

    def take(results: list[tuple], numbers: list[int]) -> None:
        for number, result in zip(numbers, results, strict=True):
            name = sources.pop(number)
            if len(result) == 2:
                if strict:
                    raise DataError(f"{name}: {BadPair(*result)}")
                rejected.append([number, 1, name, *result, None])
                result = (0, 0, 0, 0, 0, False)
            for field_name, value in zip((*MEASURED, "truncated"), result, strict=True):
                columns[field_name].append(value)
            columns["numbers"].append(number)
        if progress is not None:
            progress(len(columns["numbers"]))

    pool = ProcessPoolExecutor(workers) if workers else None
    options = (str(model_dir), json.dumps(rendering, sort_keys=True))
    try:
        pending: deque = deque()
        chunk: list = []

        def submit():
            numbers = [n for n, _ in chunk]
            if pool is None:
                take(_measure(*options, chunk), numbers)
            else:
                pending.append((pool.submit(_measure, *options, list(chunk)), numbers))
                while len(pending) > 2 * workers:
                    future, done = pending.popleft()
                    take(future.result(), done)
            chunk.clear()

        for number, (at, pair) in enumerate(source.pairs(reading)):
            for name in where:
                where[name].append(getattr(at, name))
            if (number // CHUNK) % world != rank:
                continue
            sources[number] = pair.source
            chunk.append((number, pair))
            if len(chunk) == CHUNK:
                submit()
        if chunk:
            submit()
        while pending:
            future, done = pending.popleft()
            take(future.result(), done)
    except BrokenProcessPool as e:
        raise RuntimeError(f"an indexing worker process died ({e}); nothing was written") from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _renderer.cache_clear()  # this process's renderer (tokenizer, processor): no longer needed
    numbers = np.frombuffer(columns.pop("numbers"), dtype=np.int64).copy()
    measured = {name: np.frombuffer(c, dtype=c.typecode).copy() for name, c in columns.items()}
    locations = {name: np.frombuffer(c, dtype=c.typecode).copy() for name, c in where.items()}
    return IndexPart(numbers, measured, rejected, locations)


def merge(parts: list[IndexPart], locations: dict[str, np.ndarray], key: dict, rejects: Rejects) -> PairIndex:
    """The index from every builder's part (and the whole stream's locations); the rejected records
    go to `rejects` in data order. The same bytes whatever the number of builders."""
    count = len(locations["line"])
    arrays = {**locations, **{name: np.zeros(count, dtype=FIELDS[name]) for name in MEASURED}}
    seen = np.zeros(count, dtype=np.int64)
    truncated = 0
    for part in parts:
        for name in MEASURED:
            arrays[name][part.numbers] = part.measured[name]
        seen[part.numbers] += 1
        truncated += int(part.measured["truncated"].sum())
    assert (seen == 1).all(), "every pair is measured by exactly one builder"
    found = sorted((r for part in parts for r in part.rejected), key=lambda r: (r[0], r[1]))
    for _, _, source, reason, detail, raw in found:
        rejects.add(source, BadPair(reason, detail), raw)
    return PairIndex(arrays, key, dict(Counter(r[3] for r in found)), truncated)


def build_index(source: DataSource, model_dir: str | Path, rendering: dict, rejects: Rejects, key: dict, *,
                workers: int = 0, progress=None) -> PairIndex:
    """Read and measure every pair of `source` in this process (and `workers` worker processes)."""
    start = time.perf_counter()
    part = measure(source, model_dir, rendering, strict=rejects.strict, workers=workers, progress=progress)
    index = merge([part], part.locations, key, rejects)
    index.seconds = time.perf_counter() - start
    return index
