"""The one record type every format becomes, and the accounting of bad input.

A `PreferencePair` holds the prompt as chat messages whose text marks each image with IMAGE_TOKEN
("<image>", MMPR's placeholder), the chosen and rejected responses as plain text, and the images
(file paths or encoded bytes) in placeholder order. `source` ("file:line") names where it came from.

Bad input never disappears silently: loaders and renderers raise `BadPair(reason, detail)`;
`Rejects` counts them by reason, writes each skipped record with its reason to a rejects file,
and in strict mode turns the first one into a `DataError` ("path:line: reason: detail").
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mpo.errors import BadPair, DataError

IMAGE_TOKEN = "<image>"

@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[dict, ...]  # chat messages {"role", "content": str with IMAGE_TOKEN per image}
    chosen: str
    rejected: str
    images: tuple = ()  # str paths or bytes (encoded image files), in placeholder order
    source: str = ""  # "file:line" (or "file:row N")
    max_patches: int | None = None  # MMPR's per-dataset max_dynamic_patch

    def image_count_in_prompt(self) -> int:
        return sum(m["content"].count(IMAGE_TOKEN) for m in self.prompt)


def check_responses(chosen: str, rejected: str) -> None:
    if not chosen.strip() or not rejected.strip():
        raise BadPair("empty_response", "chosen" if not chosen.strip() else "rejected")
    if chosen == rejected:
        raise BadPair("identical_responses")


@dataclass
class Rejects:
    """Counts skipped records by reason; writes them to `path` (JSONL) when given.

    strict: raise DataError at the first bad record instead of skipping it.
    """

    path: Path | None = None
    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    _file: object = None

    def __post_init__(self):
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)  # an old run's list would look like this run's

    def add(self, source: str, bad: BadPair, raw: str | None = None) -> None:
        if self.strict:
            raise DataError(f"{source}: {bad}")
        self.counts[bad.reason] += 1
        if self.path is not None:
            if self._file is None:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "w", encoding="utf-8")
            self._file.write(json.dumps({"source": source, "reason": bad.reason, "detail": bad.detail,
                                         "record": raw}, ensure_ascii=False) + "\n")
            self._file.flush()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no records skipped"
        parts = ", ".join(f"{reason} {n}" for reason, n in self.counts.most_common())
        where = f"; listed in {self.path}" if self.path is not None else ""
        return f"skipped {self.total} records ({parts}){where}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
