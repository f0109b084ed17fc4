import json
import os
import sys
import warnings
from pathlib import Path

import pytest

from remedi_patches import graders
from remedi_patches.graders import extract_boxed, extract_gsm8k_answer, grade_gsm8k, grade_math, normalize_math_answer

DATA_DIR = Path(os.environ.get("REMEDI_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _rows(relative: str) -> list[dict]:
    path = DATA_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; point REMEDI_DATA_DIR at the folder holding gsm8k/ and math500/")
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 1,600", "1600"),
        ("#### $1,450,000", "1450000"),
        ("She makes $18.00 every day.", "18"),
        ("so 16 - 3 - 4 = 9 eggs", "9"),
        ("12-3=9. 9+4=13. #### 13", "13"),
        ("#### -5", "-5"),
        ("the balance is -$3", "-3"),
        ("It is \u22127 degrees", "-7"),
        ("#### 3/4", "0.75"),
        ("#### 1/3", "1/3"),
        ("it costs 2.50 dollars", "2.5"),
        ("#### 7.0", "7"),
        ("1,2,3", "3"),  # a list, not a thousands number
        ("#### 18 and later #### 20", "18"),
        ("#### then 5 apples", "5"),
        ("the answer is 42.", "42"),
        ("no number here", None),
        ("", None),
        ("#### ", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_grade_gsm8k_unit_cases():
    assert grade_gsm8k("so she pays $1,600.00", "#### 1600")
    assert grade_gsm8k("#### 0.5", "1/2")
    assert grade_gsm8k("x = 12. #### 12", "12")
    assert not grade_gsm8k("#### 12", "13")
    assert not grade_gsm8k("I do not know", "13")
    assert not grade_gsm8k("#### -13", "13")


def test_grade_gsm8k_gold_without_number_is_an_error():
    with pytest.raises(ValueError, match="holds no number"):
        grade_gsm8k("#### 3", "unknown")


def test_gsm8k_gold_solutions_grade_correct():
    rows = _rows("gsm8k/test.jsonl")
    assert len(rows) == 1319
    failures = []
    for row in rows:
        final = row["answer"].split("####")[-1].strip()
        ok = (
            grade_gsm8k(row["answer"], row["answer"])
            and grade_gsm8k(row["answer"], final)
            and extract_gsm8k_answer(row["answer"]) == str(int(final.replace(",", "")))
        )
        if not ok:
            failures.append((final, extract_gsm8k_answer(row["answer"])))
    assert not failures, f"{len(failures)}/1319 GSM8K gold solutions graded wrong (gold, extracted): {failures}"


def test_gsm8k_grader_rejects_other_problems_answers():
    rows = _rows("gsm8k/test.jsonl")
    finals = [int(r["answer"].split("####")[-1].replace(",", "")) for r in rows]
    for i, row in enumerate(rows):
        j = (i + 1) % len(rows)
        assert grade_gsm8k(row["answer"], rows[j]["answer"]) == (finals[i] == finals[j])


# ---------------------------------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1}, finally \boxed{2}", "2"),
        (r"\fbox{x^{2}} is it", "x^{2}"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{12", None),
        (r"\boxed{}", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\frac12}", r"\frac{1}{2}", True),
        (r"\boxed{(3,\frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
        (r"\boxed{x^2+2x+1}", r"(x+1)^2", True),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
        (r"\boxed{5, 3, 7}", "3, 5, 7", True),
        (r"\boxed{90}", r"90^\circ", True),
        (r"\boxed{3}", "4", False),
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False),
        ("the answer is 4", "4", False),  # no box, no answer
    ],
)
def test_grade_math_unit_cases(pred, gold, expected):
    assert grade_math(pred, gold) is expected


@pytest.fixture
def no_math_verify(monkeypatch):
    graders._math_verify.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    yield
    graders._math_verify.cache_clear()


def test_math_fallback_without_math_verify_warns_once(no_math_verify):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert grade_math(r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}")  # strings equal after normalisation
        assert not grade_math(r"\boxed{0.5}", r"\frac{1}{2}")  # needs math-verify
        assert not grade_math(r"\boxed{0.25}", r"\frac{1}{2}")
    messages = [str(w.message) for w in caught if "math-verify is not installed" in str(w.message)]
    assert len(messages) == 1


def test_normalize_math_answer():
    assert normalize_math_answer(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_math_answer(r"\text{(C)}") == "(C)"
    assert normalize_math_answer("x = 5") == "5"
    assert normalize_math_answer("1,000.0") == "1000"
    assert normalize_math_answer(r"30^\circ") == "30"
    assert normalize_math_answer(r"25\%") == "25"


def test_math500_gold_solutions_grade_correct():
    rows = _rows("math500/test.jsonl")
    assert len(rows) == 500
    failures = [
        (r["unique_id"], extract_boxed(r["solution"]), r["answer"])
        for r in rows
        if not grade_math(r["solution"], r["answer"])
    ]
    for failure in failures:
        print("MATH-500 gold graded wrong:", failure)
    assert len(rows) - len(failures) >= 495, f"{len(failures)} failures (id, boxed, answer): {failures}"


@pytest.mark.slow  # 500 math-verify comparisons: ~3 s on an idle core
def test_math500_grader_rejects_other_problems_answers():
    rows = _rows("math500/test.jsonl")
    accepted = [
        (r["answer"], rows[(i + 1) % len(rows)]["answer"])
        for i, r in enumerate(rows)
        if grade_math(r["solution"], rows[(i + 1) % len(rows)]["answer"])
    ]
    # a neighbour's answer may only be accepted when it is the same answer written another way
    wrong = [(a, b) for a, b in accepted if normalize_math_answer(a) != normalize_math_answer(b)]
    assert not wrong, f"accepted different answers: {wrong}"
    assert len(accepted) < 10
