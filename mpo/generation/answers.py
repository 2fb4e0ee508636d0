"""Answer extraction and judging for correctness pairs.

`extract_answer` takes what follows the last "Final answer:" trigger (the instruction the sampled
responses are given), up to the end of that line (later lines are commentary; a line break right
after the trigger is skipped); a response without it is a format negative. `is_correct` then compares with
the ground truth by the first rule that applies to the ground truth:
  1. multiple choice: "B", "(B)", "B." or "B. option text": the answer's leading letter, or, when
     the answer has no letter, the option text;
  2. yes / no (true / false): the answer's first word;
  3. numbers: decimals, fractions (a/b, LaTeX \\frac), thousands separators, percent signs, leading
     currency signs, trailing units and punctuation, signs (ASCII or Unicode minus), "x = 3"; equal
     within 1e-6 relative, or equal once the answer is rounded to the ground truth's decimals;
     a percent on one side also accepts the other side times 100;
  4. anything else: normalised strings (case, spaces, punctuation, articles, LaTeX wrappers).
When the `math-verify` package is installed it is also asked for rules 3 and 4 (it knows symbolic
equivalence such as 1/2 = 0.5 = \\frac{2}{4} or x+1 = 1+x); it is never required. Whether it was
(`judge()`) is part of the settings the pair builders and `mpo eval` record, so results judged with
it are never resumed without it, or the other way round.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
from fractions import Fraction

TRIGGER = re.compile(r"final\s+answer[*_]*\s*(?:is)?\s*[*_]*[:：]", re.IGNORECASE)
_MATH_OPENERS = ("\\[", "\\(", "$$")  # a display-math line after the trigger: the answer is on the next
_LETTER_GT = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]\s*(.*))?$", re.DOTALL)
_LETTER_ANSWER = re.compile(r"^(?:(?:option|choice)\s+)?(\()?([A-Za-z])(\))?(?=$|[\s.:),])", re.IGNORECASE)
_YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"
_FRACTION = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
_LATEX_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}$")
# a number and a unit of at most three short words: "12 cm", "3.5 kg/m^2", "7 apples", "18 degrees C"
_UNITS = re.compile(r"^(.*?\d)\.?\s*([a-zA-Z°µ][a-zA-Z°µ/^²³0-9.]{0,11}(?: [a-zA-Z][a-zA-Z/^²³0-9.]{0,11}){0,2})$")


def extract_answer(text: str) -> str | None:
    """The text after the last "Final answer:" (trimmed, markdown emphasis dropped); None without one."""
    found = list(TRIGGER.finditer(text))
    if not found:
        return None
    for line in text[found[-1].end():].split("\n"):  # its line: what follows is commentary
        answer = line.strip("*_`\"' \t\r").strip()
        if answer and answer not in _MATH_OPENERS:
            return answer
    return None


def is_correct(answer: str | None, ground_truth: str) -> bool:
    """Does the extracted answer match the ground truth? (see the module docstring for the rules)"""
    if answer is None:
        return False
    truth = _unwrap(str(ground_truth))
    answer = _unwrap(answer)
    if not answer:
        return False
    choice = _choice(truth)
    if choice is not None:
        letter, option = choice
        said = _LETTER_ANSWER.match(answer)
        if said:
            rest = answer[said.end():]
            # "B", "(B) text", "B. text", "B: text" name one option; "B or D", "B, C", "a square" do not
            if not rest.strip() or (said.group(1) and said.group(3)) or rest[:1] in ".:)":
                text = rest.lstrip(".:) ").strip()
                if option and text and _norm(text) != _norm(option):
                    return False
                return said.group(2).upper() == letter
        return bool(option) and _norm(answer) == _norm(option)
    if _norm(truth) in _YES_NO:
        first = _norm(answer).split(" ")[0] if _norm(answer) else ""
        return _YES_NO.get(first) == _YES_NO[_norm(truth)]
    want, got = _number(truth), _number(answer)
    if want is not None:
        if got is not None and _numbers_match(want, got):
            return True
        return _math_verify(truth, answer)
    if _norm(answer) == _norm(truth):
        return True
    return _math_verify(truth, answer)


def answer_kind(ground_truth: str) -> str:
    """Which rule judges answers to this ground truth: "choice", "yes_no", "number" or "text"."""
    truth = _unwrap(str(ground_truth))
    if _choice(truth) is not None:
        return "choice"
    if _norm(truth) in _YES_NO:
        return "yes_no"
    return "number" if _number(truth) is not None else "text"


# --- rules ---------------------------------------------------------------------------------------------

def _unwrap(text: str) -> str:
    """Drop what wraps an answer: $...$, \\[...\\], \\boxed{...}, \\text{...}, markdown, trailing full stops."""
    text = text.strip().strip("*_`").strip()
    for opener, closer in (("\\[", "\\]"), ("\\(", "\\)")):
        text = text.removeprefix(opener).removesuffix(closer).strip()
    text = re.sub(r"^\$+|\$+$", "", text).strip() if text.count("$") >= 2 or re.fullmatch(r"\$+.*\$+", text) \
        else text
    text = _drop_commands(text, ("boxed", "text", "textbf", "mathrm", "mbox"))
    text = text.strip()
    while text and text[-1] in ".。!,;\"'“”’`*":  # closing punctuation, quotes and emphasis
        text = text[:-1].rstrip()
    while text and text[0] in "\"'“‘`*":
        text = text[1:].lstrip()
    return text


def _drop_commands(text: str, commands: tuple[str, ...]) -> str:
    """\\boxed{...} -> ..., with nested braces (\\boxed{\\frac{1}{2}})."""
    for command in commands:
        while (m := re.search(rf"\\{command}\s*\{{", text)) is not None:
            depth, end = 1, m.end()
            while end < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if depth:  # unbalanced: leave it as written
                break
            text = text[:m.start()] + text[m.end():end - 1] + text[end:]
    return text


def _choice(truth: str) -> tuple[str, str] | None:
    """(letter, option text) when the ground truth is a multiple-choice letter."""
    m = _LETTER_GT.match(truth)
    if not m or len(truth) > 1 and m.group(2) is None and not truth.startswith("("):
        return None
    letter = m.group(1)
    if not letter.isupper() and len(truth) == 1:
        return None  # a lone lower-case letter is more likely a variable than an option
    return letter.upper(), (m.group(2) or "").strip()


def _norm(text: str) -> str:
    text = text.lower().replace("\\%", "%")
    text = re.sub(r"[^\w%.\-/+ ]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    return " ".join(text.split())


class _Num:
    __slots__ = ("value", "decimals", "percent")

    def __init__(self, value: float, decimals: int | None, percent: bool):
        self.value, self.decimals, self.percent = value, decimals, percent


def _number(text: str) -> _Num | None:
    """One number written in `text` (with the wrappers the module docstring lists), else None."""
    s = text.replace("−", "-").replace("–", "-").replace("\\!", "").replace("\\,", "").replace("{,}", ",").strip()
    if "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    s = re.sub(r"^(?:approximately|about|around|roughly|~|≈)\s*", "", s, flags=re.IGNORECASE)
    percent = bool(re.search(r"(?:\\?%|percent)$", s))
    s = re.sub(r"\s*(?:\\?%|percent)$", "", s)
    sign = ""
    if len(s) > 1 and s[0] in "+-" and s[1] in "$€£¥":
        sign, s = s[0], s[1:]
    s = sign + s.lstrip("$€£¥").strip()
    m = _LATEX_FRAC.match(s)
    if m:
        num, den = _plain(m.group(2)), _plain(m.group(3))
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return _Num(-value if m.group(1) == "-" else value, None, percent)
    m = _FRACTION.match(s)
    if m:
        num, den = _plain(m.group(1)), _plain(m.group(2))
        if den == 0:
            return None
        return _Num(num / den, None, percent)
    value = _plain(s)
    if value is None:
        m = _UNITS.match(s)
        if m and _plain(m.group(1)) is not None:
            s = m.group(1)
            value = _plain(s)
    if value is None:
        return None
    decimals = len(s.split(".")[1]) if "." in s and "e" not in s.lower() else 0
    return _Num(value, decimals, percent)


def _plain(s: str) -> float | None:
    s = s.strip()
    if not re.fullmatch(_NUMBER, s):
        return None
    return float(s.replace(",", ""))


def _numbers_match(want: _Num, got: _Num) -> bool:
    candidates = [got.value]
    if want.percent and not got.percent:  # truth "50%", answer "0.5"
        candidates.append(got.value * 100)
    elif got.percent and not want.percent:  # truth "0.5", answer "50%"
        candidates.append(got.value / 100)
    for value in candidates:
        if math.isclose(value, want.value, rel_tol=1e-6, abs_tol=1e-9):
            return True
        if want.decimals and (got.decimals is None or got.decimals > want.decimals) and \
                _round(value, want.decimals) == _round(want.value, want.decimals):
            return True
    return False


def _round(value: float, decimals: int) -> Fraction:
    # half away from zero on the exact decimal, not on the binary float
    q = Fraction(str(value)) * 10**decimals
    return Fraction(math.floor(abs(q) + Fraction(1, 2)) * (1 if q >= 0 else -1), 10**decimals)


def judge() -> str:
    """Which rules `is_correct` applies here: "mpo" alone, or "mpo+math-verify <version>"."""
    try:
        return f"mpo+math-verify {importlib.metadata.version('math-verify')}"
    except importlib.metadata.PackageNotFoundError:
        return "mpo"


def _math_verify(truth: str, answer: str) -> bool:
    if importlib.util.find_spec("math_verify") is None:
        return False
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"${truth}$"), parse(f"${answer}$")))
    except Exception:  # math-verify raises on input it cannot parse: not a match
        return False
