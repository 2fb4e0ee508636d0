"""Sampling, request building and answer judging shared by the pair builders, `mpo eval` and training.

`sampler` runs the model's own `generate` on prompts rendered as the trainer renders them;
`prompts` reads and checks the prompt files; `answers` extracts and compares final answers;
`judging` turns prompts into requests and responses into verdicts.
"""

from mpo.generation.answers import extract_answer, is_correct

__all__ = ["extract_answer", "is_correct"]
