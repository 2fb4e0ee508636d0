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
every command finds the one it can use. Workers render in parallel (`workers` processes, in
chunks, a bounded number in flight); rejected records are counted and listed in data order
whatever the worker count.
"""

from __future__ import annotations

import hashlib
import json
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
from mpo.data.records import BadPair, Rejects
from mpo.data.render import ImageOptions, RenderedPair, Renderer

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
        save_atomic({k: torch.from_numpy(v) for k, v in self.arrays.items()}, path,
                    {"key": json.dumps(self.key, sort_keys=True), "rejected": json.dumps(self.rejected),
                     "truncated": str(self.truncated)})

    @classmethod
    def load(cls, path: Path, key: dict) -> PairIndex | None:
        """The index at `path` when it was built from this data the same way, else None."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            if meta.get("key") != json.dumps(key, sort_keys=True) or set(f.keys()) != set(FIELDS):
                return None
            arrays = {k: f.get_tensor(k) for k in FIELDS}
        return cls(arrays, key, json.loads(meta["rejected"]), int(meta["truncated"]))


# --- building it --------------------------------------------------------------------------------------------

_worker: dict = {}


def _start_worker(model_dir: str, rendering: dict) -> None:
    _worker["renderer"] = Renderer(model_dir, image_options(rendering))
    _worker["rendering"] = rendering


def _measure(chunk: list[tuple[int, object]]) -> list[tuple]:
    """Per pair: (prompt, chosen, rejected, tiles, fingerprint, truncated) or (reason, detail)."""
    renderer, r = _worker["renderer"], _worker["rendering"]
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


def build_index(source: DataSource, model_dir: str | Path, rendering: dict, rejects: Rejects, key: dict, *,
                workers: int = 0, progress=None) -> PairIndex:
    """Read and measure every pair of `source` (in `workers` processes; 0: in this one)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    columns = {name: array(code) for name, code in FIELDS.items()}
    sources: dict[int, str] = {}  # pair number -> "file:line", only while its chunk is in flight
    truncated = 0

    def take(results: list[tuple], numbers: list[int]) -> None:
        nonlocal truncated
        for number, result in zip(numbers, results, strict=True):
            name = sources.pop(number)
            if len(result) == 2:
                rejects.add(name, BadPair(*result))
                result = (0, 0, 0, 0, 0, False)
            for field, value in zip(MEASURED, result[:5], strict=True):
                columns[field].append(value)
            truncated += result[5]
        if progress is not None:
            progress(len(columns["fingerprint"]))

    start, before = time.perf_counter(), Counter(rejects.counts)
    pool = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(str(model_dir), rendering)) \
        if workers else None
    if pool is None:
        _start_worker(str(model_dir), rendering)
    try:
        pending: deque = deque()
        chunk: list = []

        def submit():
            numbers = [n for n, _ in chunk]
            if pool is None:
                take(_measure(chunk), numbers)
            else:
                pending.append((pool.submit(_measure, list(chunk)), numbers))
                while len(pending) > 2 * workers:
                    future, done = pending.popleft()
                    take(future.result(), done)
            chunk.clear()

        for number, (where, pair) in enumerate(source.pairs(rejects)):
            columns["source"].append(where.source)
            columns["offset"].append(where.offset)
            columns["line"].append(where.line)
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
        _worker.clear()
    arrays = {name: np.frombuffer(column, dtype=column.typecode).copy() for name, column in columns.items()}
    index = PairIndex(arrays, key, dict(rejects.counts - before), truncated)
    index.seconds = time.perf_counter() - start
    return index
