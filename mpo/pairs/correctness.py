"""Correctness pairs: sample K responses per prompt, judge them against the ground truth, pair.

Every correct response is paired with every wrong one (distinct texts only), except where the
wrong text contains the ground-truth answer as a token of its own ("7" in "... so 7 apples" but
not in "17"): such a response may well reason correctly and slip at the end, and MMPR drops those
pairs. The check applies to numbers and texts, not to option letters or yes/no. Responses without
the "Final answer:" trigger are format negatives: counted, and used as rejected responses only
with `format_negatives=True`. A response cut off by the token limit (no end-of-turn) is counted as
`truncated` and never chosen, however right its answer: it may state "Final answer: 26" and then
ramble on, and the model would learn to. It is a rejected response only with
`truncated_negatives=True` (and, without the trigger, `format_negatives=True`). At most `max_pairs`
pairs per prompt, a seeded sample of all candidates (taking the first ones would favour the first
correct response).
"""

from __future__ import annotations

import random
from collections import Counter

from mpo.errors import BadPair
from mpo.generation.judging import INSTRUCTION, contains_answer, question_with_instruction, requests_for, verdict
from mpo.generation.prompts import PromptRecord
from mpo.generation.sampler import Completion, Sampler


def judge_and_pair(record: PromptRecord, responses: list[Completion], *, question: str, max_pairs: int,
                   format_negatives: bool, seed: int, truncated_negatives: bool = False) -> dict:
    """One prompt's result: its pairs and per-reason counts."""
    counts: Counter = Counter(prompts=1, responses=len(responses))
    correct, rejected_pool = [], []
    for response in responses:
        kind = verdict(response.text, record.answer)
        counts[kind] += 1
        if response.truncated:
            counts["truncated"] += 1
        if kind == "correct" and not response.truncated:
            correct.append(response.text)
        elif (kind == "wrong" or format_negatives and kind == "unparsable") \
                and (truncated_negatives or not response.truncated):
            rejected_pool.append(response.text)
    rejected_pool = list(dict.fromkeys(rejected_pool))
    candidates = []
    for chosen in dict.fromkeys(correct):
        for rejected in rejected_pool:
            if contains_answer(rejected, record.answer):
                counts["skipped_contains_answer"] += 1
            else:
                candidates.append((chosen, rejected))
    if len(candidates) > max_pairs:
        candidates = random.Random(f"{seed}|{record.id}").sample(candidates, max_pairs)
    if not candidates:
        counts["no_pair_possible"] += 1
    pairs = [{**record.extra, "id": record.id, "question": question, "chosen": c, "rejected": r,
              "answer": record.answer, "image": [str(p) for p in record.images]} for c, r in candidates]
    return {"id": record.id, "counts": dict(counts), "pairs": pairs}


def correctness_process(sampler: Sampler, *, samples: int, max_pairs: int, instruction: str = INSTRUCTION,
                        temperature: float = 1.0, format_negatives: bool = False, truncated_negatives: bool = False,
                        seed: int = 0):
    """The per-chunk step of `mpo pairs correctness` (see `mpo.pairs.run.build`)."""
    def process(chunk: list[PromptRecord]) -> list[dict]:
        questions = {r.id: question_with_instruction(r.question, instruction) for r in chunk}
        texts = sampler.generate(requests_for(chunk, samples, instruction), temperature=temperature, seed=seed)
        results = []
        for k, r in enumerate(chunk):
            mine = texts[k * samples:(k + 1) * samples]
            bad = next((t for t in mine if isinstance(t, BadPair)), None)
            if bad is not None:  # its prompt could not be rendered (all samples share it)
                results.append({"id": r.id, "counts": {"prompts": 1, bad.reason: 1, "no_pair_possible": 1},
                                "pairs": [], "error": str(bad)})
                continue
            results.append(judge_and_pair(r, mine, question=questions[r.id], max_pairs=max_pairs,
                                          format_negatives=format_negatives, truncated_negatives=truncated_negatives,
                                          seed=seed))
        return results
    return process
