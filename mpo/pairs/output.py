"""Resumable output of the pair builders, and the MMPR folder made from it.

While running, each rank appends one JSON line per finished prompt to
`OUT/work/results.rank<r>.jsonl` (its pairs and its per-reason counts), flushed and fsynced, so
a prompt is either wholly recorded or not at all. A rerun reads every rank's file (whatever the
world size was), skips the prompts already there and drops a last line cut short by a kill (that
prompt is simply redone); `OUT/work/settings.json` records how the results were made (builder,
model, input, sampling options), and a rerun with other settings is refused rather than mixed in.
At the end rank 0 writes the MMPR folder, each file to a temporary
name and renamed:
  OUT/meta.json                  {NAME: {"root": "images", "annotation": "annotations/NAME.jsonl", ...}}
  OUT/annotations/NAME.jsonl     {"image", "question", "chosen", "rejected", "id", ...} in input order
  OUT/images/...                 the pairs' images, hard-linked (copied across file systems) or copied
  OUT/summary.json               the per-reason counts
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from mpo.atomic import write_text_atomic
from mpo.errors import DataError


class ResultLog:
    """This rank's append-only result file, and what every rank has finished so far."""

    def __init__(self, out_dir: str | Path, rank: int):
        self.work = Path(out_dir) / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = self.work / f"results.rank{rank}.jsonl"
        self.finished = read_results(self.work)
        self._file = self.path.open("a", encoding="utf-8")

    def append(self, result: dict) -> None:
        self._file.write(json.dumps(result, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.finished[result["id"]] = result

    def close(self) -> None:
        self._file.close()


def read_results(work: Path) -> dict[str, dict]:
    """{prompt id: result} from every rank's file; a torn last line is cut off its file."""
    results = {}
    for path in sorted(work.glob("results.rank*.jsonl")):
        data = path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                result = json.loads(line)
            except ValueError:
                if good + len(line) < len(data):
                    raise DataError(f"{path}: a corrupt line in the middle of the file (byte {good}); "
                                    "it was not written by an interrupted run") from None
                with path.open("r+b") as f:  # the torn tail of a killed run: redo that prompt
                    f.truncate(good)
                break
            results[result["id"]] = result
            good += len(line)
    return results


def results_in_order(out_dir: Path, order: list[str], what: str) -> list[dict]:
    """Every rank's results in input order (`order`: the ids); refused while one of the `what`
    (prompts, questions) has none yet."""
    results = read_results(out_dir / "work")
    missing = [i for i in order if i not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} {what} have no result yet (first: {missing[0]!r}); rerun to finish them")
    return [results[i] for i in order]


def write_mmpr(out_dir: str | Path, name: str, order: list[str], image_root: Path, *, images: str = "link") -> dict:
    """The MMPR folder from every rank's results, pairs in input order -> the summed counts."""
    out_dir = Path(out_dir)
    counts: Counter = Counter()
    placed: dict[Path, str] = {}
    annotation = out_dir / "annotations" / f"{name}.jsonl"
    annotation.parent.mkdir(parents=True, exist_ok=True)
    tmp = annotation.with_name(annotation.name + ".tmp")
    pairs = 0
    with tmp.open("w", encoding="utf-8") as f:
        for result in results_in_order(out_dir, order, "prompts"):
            counts.update(result["counts"])
            for pair in result["pairs"]:
                row = dict(pair)
                if row.get("image"):
                    row["image"] = [_place(Path(p), image_root, out_dir / "images", placed, images)
                                    for p in row["image"]]
                    if len(row["image"]) == 1:
                        row["image"] = row["image"][0]
                else:
                    row.pop("image", None)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                pairs += 1
    tmp.replace(annotation)
    counts["pairs"] = pairs
    meta = {name: {"root": "images", "annotation": f"annotations/{name}.jsonl", "repeat_time": 1,
                   "data_augment": False, "length": pairs}}
    _write_json(out_dir / "meta.json", meta)
    _write_json(out_dir / "summary.json", dict(sorted(counts.items())))
    return dict(counts)


def _place(src: Path, image_root: Path, images_dir: Path, placed: dict, how: str) -> str:
    """The image's path under OUT/images (its path under the input's image root, when it has one)."""
    if src in placed:
        return placed[src]
    try:
        rel = src.resolve().relative_to(image_root.resolve())
    except ValueError:
        rel = Path("external") / hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12] / src.name
    dest = images_dir / rel
    _verify_image(src)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        if how == "link":
            try:
                os.link(src, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(src, tmp)
        else:
            shutil.copy2(src, tmp)
        tmp.replace(dest)
    placed[src] = rel.as_posix()
    return placed[src]


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _verify_image(path: Path) -> None:
    """Only image files go into a dataset (a file merely named as one, a key, is refused)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # Pillow raises many types for a file that is not an image
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}); not placed into the dataset") from None
