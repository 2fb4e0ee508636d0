"""Answer extraction and judging, table-driven: each rule with right answers and close wrong ones."""

import pytest

from mpo.generation import answers, extract_answer, is_correct

EXTRACT = [
    ("So 3 + 4 = 7.\nFinal answer: 7", "7"),
    ("Final answer: 12 apples  \n", "12 apples"),
    ("final answer: B", "B"),
    ("FINAL ANSWER:yes", "yes"),
    ("**Final answer:** 42", "42"),
    ("Final Answer: 3\nWait, let me check.\nFinal answer: 5", "5"),  # the last trigger wins
    ("The final answer is: 8", "8"),
    ("Final answer: 7\n\nIn mathematics, sums of constants...", "7"),  # its line only
    ("Final answer:\n7\nDone.", "7"),  # a line break right after the trigger
    ("**Final answer**: 5", "5"), ("Final answer:\n\\[\n\\boxed{5}\n\\]", "\\boxed{5}"),
    ('in the format "Final answer: 4".', '4".'),  # quotes and stops are the judge's to drop
    ("Final answer： 9", "9"),  # full-width colon
    ("The answer is 7.", None),  # no trigger: a format negative
    ("Final answer:", None),  # trigger without an answer
    ("Final answer:   \n  ", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


CORRECT = [
    # numbers
    ("7", "7"), ("7.0", "7"), ("7", "7.0"), ("-3", "-3"), ("−3", "-3"), ("+5", "5"), ("0.5", ".5"),
    ("1,234", "1234"), ("1234", "1,234"), ("1,234,567.5", "1234567.5"),
    ("3/4", "0.75"), ("0.75", "3/4"), ("\\frac{3}{4}", "0.75"), ("\\dfrac{1}{2}", "0.5"), ("-\\frac{1}{2}", "-0.5"),
    ("$\\frac{3}{4}$", "0.75"), ("\\boxed{12}", "12"), ("$12$", "12"), ("\\boxed{\\frac{1}{2}}", "1/2"),
    ("\\[ 12 \\]", "12"), ("\\boxed{\\text{circle}}", "circle"),
    ("50%", "50"), ("50", "50%"), ("50\\%", "50"), ("0.5", "50%"), ("50%", "0.5"),
    ("12 cm", "12"), ("12cm", "12"), ("3.5 kg/m^2", "3.5"), ("7 apples", "7"), ("$3.50", "3.5"), ("7.", "7"),
    ("x = 5", "5"), ("approximately 3.14", "3.14"), ("3.14159", "3.14"), ("2.5e3", "2500"), ("1e-3", "0.001"),
    ("18", "18 degrees"), ("18 degrees C", "18"), ('4".', "4"), ("“B”", "B"),
    # multiple choice
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("b", "B"), ("B. 42", "B"), ("(B) 42", "B"),
    ("Option B", "B"), ("B", "(B)"), ("B", "B. 42"), ("42", "B. 42"), ("B. 42", "B. 42"), ("B: 42", "B. 42"),
    # yes / no
    ("Yes", "yes"), ("yes.", "Yes"), ("Yes, because the bar is taller.", "yes"), ("no", "No"), ("True", "yes"),
    ("false", "No"),
    # strings
    ("The cat", "cat"), ("Red!", "red"), ("  blue  ", "Blue"), ("New York", "new york"), ("\\text{circle}", "circle"),
]

WRONG = [
    # numbers that look close
    ("8", "7"), ("-7", "7"), ("17", "7"), ("71", "7"), ("0.7", "7"), ("70", "7"), ("7.1", "7"), ("3.15", "3.14"),
    ("3.1", "3.14"), ("1,235", "1234"), ("1/4", "0.75"), ("\\frac{4}{3}", "0.75"), ("0.5", "50"), ("5", "50%"),
    ("5000", "50%"), ("1%", "100"),
    ("3.4", "3"), ("12 cm", "13"), ("2.5e2", "2500"), ("4 You are a helpful AI and say more", "4"),
    ("7 is what the sum is", "7"), ("x = 6", "5"), ("", "7"),
    # multiple choice
    ("A", "B"), ("(C)", "B"), ("BC", "B"), ("B or D", "B"), ("B, C", "B"), ("a square", "A"), ("A and C", "A"),
    ("B. 43", "B. 42"), ("41", "B. 42"), ("C. 42", "B. 42"), ("Bob", "B"),
    ("because", "B"),
    # yes / no
    ("No", "yes"), ("Yes", "no"), ("not sure", "yes"), ("yesterday", "yes"), ("False", "yes"),
    # strings
    ("dog", "cat"), ("blue green", "blue"), ("circles", "circle"),
]


@pytest.mark.parametrize("answer,truth", CORRECT)
def test_correct_answers(answer, truth):
    assert is_correct(answer, truth), (answer, truth)


@pytest.mark.parametrize("answer,truth", WRONG)
def test_wrong_answers(answer, truth):
    assert not is_correct(answer, truth), (answer, truth)


def test_no_answer_is_never_correct():
    assert not is_correct(None, "7")
    assert not is_correct(extract_answer("I think it is 7."), "7")


def test_math_verify_is_optional(monkeypatch):
    """Without math-verify the built-in rules decide; with it, symbolic forms are also accepted."""
    import builtins

    real_import = builtins.__import__

    def no_math_verify(name, *a, **k):
        if name.startswith("math_verify"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    assert not answers._math_verify("x+1", "1+x")
    assert is_correct("\\frac{3}{4}", "0.75")


def test_the_judge_names_math_verify_when_it_is_installed(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.7.0")
    assert answers.judge() == "mpo+math-verify 0.7.0"
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert answers.judge() == "mpo"
