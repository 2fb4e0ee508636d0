"""Asking a prompt and judging the answer: what the correctness builder, `mpo eval` and training-time
answers share. A question goes out with the instruction that asks for a last "Final answer:" line;
a response is correct, wrong, or unparsable (no such line) against the ground truth.
"""

from __future__ import annotations

import re

from mpo.generation.answers import answer_kind, extract_answer, is_correct
from mpo.generation.prompts import PromptRecord
from mpo.generation.sampler import Request

INSTRUCTION = "Think step by step, then finish your response with a last line of the form \"Final answer: <answer>\"."


def question_with_instruction(question: str, instruction: str) -> str:
    return f"{question}\n{instruction}" if instruction else question


def requests_for(records: list[PromptRecord], samples: int, instruction: str) -> list[Request]:
    """`samples` requests per record (keyed "<id>#<sample>"), its question with the instruction."""
    return [Request(f"{r.id}#{s}", ({"role": "user", "content": question_with_instruction(r.question, instruction)},),
                    r.images) for r in records for s in range(samples)]


def contains_answer(text: str, answer: str) -> bool:
    """Does `text` hold the ground truth as a token of its own? Never for option letters and yes/no,
    which appear in almost any text ("a", "no") without meaning the answer."""
    if answer_kind(answer) in ("choice", "yes_no"):
        return False
    return re.search(rf"(?<![\w.]){re.escape(answer.strip())}(?!\w|\.\d)", text, re.IGNORECASE) is not None


def verdict(text: str, answer: str) -> str:
    """correct, wrong, or unparsable (no "Final answer:" trigger)."""
    said = extract_answer(text)
    if said is None:
        return "unparsable"
    return "correct" if is_correct(said, answer) else "wrong"
