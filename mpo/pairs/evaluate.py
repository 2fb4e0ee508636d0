"""`mpo eval`: how many held-out questions a model answers correctly.

The prompts file is `mpo pairs correctness`'s (question, answer, optional images); each question gets
the same instruction and is rendered and sampled the same way (`mpo.generation.sampler`), and judged by
the same rules (`mpo.generation.answers`), so what the pair builder calls correct is what this counts.
Greedy decoding by default; with K samples per question, `accuracy` is the mean share of correct
samples (an estimate of pass@1) and `pass@K` the share of questions with a correct sample.
A question that cannot be rendered (an unreadable image), or that is refused before sampling (a
special token of the tokenizer typed into it, no room for the answer within the model's positions:
`mpo.generation.prompts.refusal`), counts as answered wrongly, with its reason and its file:line.
Sharded over `torchrun` ranks and resumable like the pair builders (`mpo.pairs.run`); rank 0 writes
  OUT/eval.json      accuracy, pass@K, the share of responses with the "Final answer:" trigger and
                     of truncated ones (no end-of-turn within --max-new-tokens), per-reason counts
  OUT/items.jsonl    per question, in input order: question, answer, responses, extracted answers,
                     verdicts, truncation
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mpo.atomic import write_text_atomic
from mpo.errors import BadPair
from mpo.generation.answers import extract_answer
from mpo.generation.judging import question_with_instruction, requests_for, verdict
from mpo.generation.prompts import PromptRecord
from mpo.generation.sampler import Sampler
from mpo.pairs.output import results_in_order


def eval_process(sampler: Sampler, *, samples: int, instruction: str, temperature: float, seed: int,
                 refused: dict[str, BadPair] | None = None):
    """The per-chunk step of `mpo eval` (see `mpo.pairs.run.run_prompts`); `refused`: the questions
    not to sample, by id, with the reason."""
    refused = refused or {}

    def process(chunk: list[PromptRecord]) -> list[dict]:
        todo = [r for r in chunk if r.id not in refused]
        done = iter(sampler.generate(requests_for(todo, samples, instruction), temperature=temperature, seed=seed))
        return [judge(r, question_with_instruction(r.question, instruction),
                      [refused[r.id]] if r.id in refused else [next(done) for _ in range(samples)])
                for r in chunk]
    return process


def judge(record: PromptRecord, question: str, completions: list) -> dict:
    """One question's result: its responses and their verdicts (all samples share a render failure)."""
    item = {"id": record.id, "question": question, "answer": record.answer,
            "image": [str(p) for p in record.images]}
    bad = next((c for c in completions if isinstance(c, BadPair)), None)
    if bad is not None:
        return {**item, "error": f"{record.source}: {bad}", "counts": {"questions": 1, bad.reason: 1}}
    verdicts = [verdict(c.text, record.answer) for c in completions]
    counts = Counter(verdicts + ["truncated" for c in completions if c.truncated])
    counts.update(questions=1, responses=len(completions))
    return {**item, "responses": [c.text for c in completions],
            "extracted": [extract_answer(c.text) for c in completions], "verdicts": verdicts,
            "truncated": [c.truncated for c in completions], "counts": dict(counts)}


def summarize(results: list[dict], samples: int) -> dict:
    """The report of a finished evaluation (results in input order)."""
    counts: Counter = Counter()
    score = solved = 0.0
    for r in results:
        counts.update(r["counts"])
        correct = r["counts"].get("correct", 0)
        score += correct / samples
        solved += correct > 0
    n = len(results)
    responses = counts.get("responses", 0)
    report = {"questions": n, "samples": samples, "accuracy": score / n}
    if samples > 1:
        report[f"pass@{samples}"] = solved / n
    report["with_trigger"] = (responses - counts.get("unparsable", 0)) / responses if responses else 0.0
    report["truncated"] = counts.get("truncated", 0) / responses if responses else 0.0
    report["counts"] = dict(sorted(counts.items()))
    return report


def write_report(out_dir: str | Path, order: list[str], settings: dict) -> dict:
    """OUT/eval.json and OUT/items.jsonl from every rank's results -> the report."""
    out_dir = Path(out_dir)
    ordered = results_in_order(out_dir, order, "questions")
    report = {**summarize(ordered, settings["samples"]), "settings": settings}
    write_text_atomic(out_dir / "items.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    write_text_atomic(out_dir / "eval.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
