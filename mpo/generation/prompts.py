"""Input records of the pair builders: JSONL, one prompt per line.

    {"id": "q17", "question": "How many dots?", "image": "imgs/q17.png", "answer": "4"}
    {"question": "What is 3 + 4?", "answer": "7"}                         (text-only)
    {"question": "<image>\\nDescribe it.", "image": ["a.png", "b.png"], "chosen": "It shows ..."}

`question` (or `prompt`) is required; `image` is a path, a list of paths or absent (relative paths
are resolved against `--image-root`, default the file's folder), with `<image>` placeholders
prepended when the question has none, as MMPR does; `answer` (the ground truth) is required by
`correctness`, `chosen` by `dropout-ntp` (a `rejected` field is ignored); `id` defaults to the
line number; other fields are carried into the output. Every line is checked
before any model runs: a bad one stops the command with `path:line: reason`, so nothing is
generated for a file that would fail halfway. The file is read as the training data is (a regular
file only, lines of at most 64 MiB). Once the tokenizer is loaded, `refusal` says why a prompt must
not be sampled: a special token of the tokenizer typed into it, or no room for the answer within
the model's positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mpo.data.formats import check_regular_file, file_lines, with_placeholders
from mpo.data.render import Renderer
from mpo.errors import BadPair, DataError
from mpo.generation.sampler import Request


@dataclass(frozen=True)
class PromptRecord:
    id: str
    question: str  # with one IMAGE_TOKEN per image
    images: tuple[Path, ...]
    answer: str | None
    chosen: str | None
    source: str  # "file:line"
    extra: dict  # the line's other fields, carried into the output

    @property
    def messages(self) -> tuple[dict, ...]:
        return ({"role": "user", "content": self.question},)


def read_prompts(path: str | Path, *, need: str, image_root: str | Path | None = None,
                 allow_outside_root: bool = False) -> list[PromptRecord]:
    """Every record of a prompts file; `need` = "answer" or "chosen" (the field the builder requires).
    Images must resolve (symlinks followed) under image_root (default: the file's folder) unless
    allow_outside_root: they are placed into a dataset others may get."""
    path = Path(path)
    try:
        check_regular_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file not found: {path}") from None
    root = Path(image_root) if image_root else path.parent
    records, seen = [], {}
    for _, line_no, line in file_lines(path):
        where = f"{path}:{line_no}"
        if isinstance(line, BadPair):
            raise DataError(f"{where}: {line.detail}")
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a line must be a JSON object")
        records.append(_record(row, where, line_no, need, root, allow_outside_root))
        if records[-1].id in seen:
            raise DataError(f"{where}: id {records[-1].id!r} repeats line {seen[records[-1].id]}")
        seen[records[-1].id] = line_no
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _record(row: dict, where: str, line_no: int, need: str, root: Path, allow_outside: bool) -> PromptRecord:
    question = row.get("question", row.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' (or 'prompt') must be a non-empty string")
    value = row.get(need)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and need == "answer":
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {need!r} must be a non-empty string")
    image = row.get("image", row.get("images"))
    refs = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    images = tuple(p if p.is_absolute() else root / p for p in map(Path, refs))
    for p in images:
        if not p.is_file():
            raise DataError(f"{where}: image not found: {p}")
        if not allow_outside and not p.resolve().is_relative_to(root.resolve()):
            raise DataError(f"{where}: image {p} resolves outside the image root {root} "
                            "(--allow-outside-root to allow it)")
    try:
        question = with_placeholders(question, len(images))
    except BadPair as bad:
        raise DataError(f"{where}: {bad.detail}") from None
    ident = row.get("id", line_no)
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise DataError(f"{where}: 'id' must be a string or an integer")
    known = ({"id", "question", "prompt", "image", "images", "chosen", "rejected"}
             | ({"answer"} if need == "answer" else set()))
    return PromptRecord(str(ident), question, images, value if need == "answer" else None,
                        value if need == "chosen" else None, where, {k: v for k, v in row.items() if k not in known})



def positions(config) -> int | None:
    """The positions a model was built for (a vision-language model: its language model's), if known."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def refusal(renderer: Renderer, request: Request | None, texts: tuple[str, ...], *, max_new_tokens: int,
            limit: int | None, setting: str) -> BadPair | None:
    """Why a prompt must not be sampled, or None: a special token of the tokenizer typed into one of
    `texts` (it would forge a chat turn, and training rejects the pair it makes), or a `request`
    whose tokens and max_new_tokens (`setting` names where it is set) exceed the model's `limit` of
    positions (past them a rotary model answers from positions it never saw, silently). A request
    that does not render passes: the sampler reports it as it reports any such prompt."""
    try:
        renderer.check_text(*texts)
    except BadPair as bad:
        return bad
    if request is None or limit is None:
        return None
    try:
        ids, _, _ = renderer.prompt(request.messages, request.images, response_prefix=request.response_prefix)
    except BadPair:
        return None
    if len(ids) + max_new_tokens > limit:
        return BadPair("too_long", f"the prompt's {len(ids)} tokens and {setting} {max_new_tokens} exceed the "
                                   f"model's {limit} positions (max_position_embeddings)")
    return None
