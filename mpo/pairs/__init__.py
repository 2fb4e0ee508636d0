"""Preference pairs built the way MMPR was: correctness pairs and DropoutNTP pairs."""

from mpo.pairs.answers import extract_answer, is_correct

__all__ = ["extract_answer", "is_correct"]
