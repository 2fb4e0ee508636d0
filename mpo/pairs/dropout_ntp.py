"""DropoutNTP pairs: the chosen response cut at a ratio of its words, continued without the image.

The prefix keeps the chosen text exactly (its own spacing) up to the end of word
floor(ratio x words); the model continues it as the start of its own answer, from the question
with its image placeholders removed and no image; prefix + continuation is the rejected response.
The paper found a ratio of 0.5 best (0.25 and 0.75 did worse). Prompts whose chosen response has
fewer than two words cannot be cut (counted as too_short); an empty continuation, or one that
reproduces the chosen response, makes no pair.
"""

from __future__ import annotations

import re
from collections import Counter

from mpo.data.records import IMAGE_TOKEN
from mpo.errors import BadPair
from mpo.generation.prompts import PromptRecord
from mpo.generation.sampler import Request, Sampler


def cut(text: str, ratio: float) -> str | None:
    """The text up to the end of its floor(ratio x words)-th word; None when that is no real cut."""
    words = list(re.finditer(r"\S+", text))
    keep = int(len(words) * ratio)
    if keep < 1 or keep >= len(words):
        return None
    return text[:words[keep - 1].end()]


def without_images(question: str) -> str:
    return "\n".join(line for line in question.replace(IMAGE_TOKEN, "").split("\n") if line.strip()).strip()


def continuation(record: PromptRecord, ratio: float) -> Request | None:
    """The request continuing the record's cut chosen response without its images; None when the
    response cannot be cut."""
    prefix = cut(record.chosen, ratio)
    if prefix is None:
        return None
    return Request(record.id, ({"role": "user", "content": without_images(record.question)},), response_prefix=prefix)


def dropout_process(sampler: Sampler, *, ratio: float = 0.5, temperature: float = 1.0, seed: int = 0):
    """The per-chunk step of `mpo pairs dropout-ntp` (see `mpo.pairs.run.build`)."""
    def process(chunk: list[PromptRecord]) -> list[dict]:
        requests = {r.id: continuation(r, ratio) for r in chunk}
        todo = [q for q in requests.values() if q is not None]
        continuations = dict(zip((q.key for q in todo), sampler.generate(todo, temperature=temperature, seed=seed)))
        results = []
        for r in chunk:
            counts: Counter = Counter(prompts=1)
            pairs = []
            if requests[r.id] is None:
                counts["too_short"] += 1
            elif isinstance(continuations[r.id], BadPair):
                counts[continuations[r.id].reason] += 1
            elif not continuations[r.id].text.strip():
                counts["empty_continuation"] += 1
            else:
                rejected = requests[r.id].response_prefix + continuations[r.id].text
                if rejected.strip() == r.chosen.strip():
                    counts["identical"] += 1
                else:
                    counts["continued"] += 1
                    pairs.append({**r.extra, "id": r.id, "question": r.question, "chosen": r.chosen,
                                  "rejected": rejected, "image": [str(p) for p in r.images]})
            if not pairs:
                counts["no_pair_possible"] += 1
            results.append({"id": r.id, "counts": dict(counts), "pairs": pairs})
        return results
    return process
