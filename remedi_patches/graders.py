"""Answer graders for GSM8K-style (`#### N`) and MATH-style (`\\boxed{...}`) outputs.

GSM8K: the number after `####` if there is one, else the last number of the text; numbers are compared
as exact fractions, so `1,600`, `$1600`, `1600.00` and `1600` are the same answer.
MATH: the content of the last `\\boxed{...}` / `\\fbox{...}`, compared with the gold answer by normalised
string equality or, when that fails, by math-verify (symbolic / numeric equivalence). Without math-verify
only the string comparison runs, and a warning says so once.
"""

import functools
import re
import threading
import warnings
from fractions import Fraction
from typing import Optional

# ---------------------------------------------------------------------------------------------------- GSM8K

# a number: optional sign (not a hyphen between two operands), optional `$`, digits with optional
# thousands commas (groups of three only, so "1,2,3" stays three numbers), optional decimals, optional `/q`.
_NUMBER = (
    r"(?:(?<![\w)\]])[-\u2212])?\$?"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
    r"(?:/\d+)?"
)
_NUMBER_RE = re.compile(_NUMBER)
_HASH_RE = re.compile(r"####\s*(" + _NUMBER + ")")


def _to_fraction(token: str) -> Optional[Fraction]:
    s = token.replace("\u2212", "-").replace("$", "").replace(",", "")
    s = re.sub(r"\s+", "", s)
    if not re.search(r"\d", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _canonical(value: Fraction) -> str:
    """Integers as `18`, terminating decimals as `2.5`, anything else as `p/q`."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    return f"{float(value):.12f}".rstrip("0").rstrip(".")


def _numbers(text: str) -> list[Fraction]:
    out = []
    for m in _NUMBER_RE.finditer(text):
        value = _to_fraction(m.group(0))
        if value is not None:
            out.append(value)
    return out


def _gsm8k_value(text: str) -> Optional[Fraction]:
    for m in _HASH_RE.finditer(text):
        value = _to_fraction(m.group(1))
        if value is not None:
            return value
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def extract_gsm8k_answer(text: str) -> Optional[str]:
    """Final answer of a GSM8K-style text in canonical form (`"1600"`, `"-3"`, `"2.5"`, `"3/4"`), or None."""
    value = _gsm8k_value(text)
    return None if value is None else _canonical(value)


def grade_gsm8k(prediction_text: str, gold_text_or_answer: str) -> bool:
    """True when the prediction's final number equals the gold one (a full `#### N` solution or just `N`)."""
    gold = _gsm8k_value(str(gold_text_or_answer))
    if gold is None:
        raise ValueError(
            f"gold answer {gold_text_or_answer!r} holds no number; pass the GSM8K `answer` field "
            "(a solution ending in `#### N`) or the final number itself"
        )
    pred = _gsm8k_value(prediction_text)
    return pred is not None and pred == gold


# ---------------------------------------------------------------------------------------------------- MATH

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> Optional[str]:
    """Content of the balanced `{...}` group opening at text[start], or None when it never closes."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped char (`\{`, `\}`) never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (balanced braces; also `\\boxed 5`), or None."""
    for m in reversed(list(_BOXED_RE.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _braced(text, i)
        elif i > m.end():
            content = re.match(r"[^\s$]*", text[i:]).group(0).rstrip(".")
        else:
            content = None
        if content is not None and content.strip():
            return content.strip()
    return None


def normalize_math_answer(answer: str) -> str:
    """A conservative canonical string for MATH answers: spacing, `\\left`/`\\right`, `\\text{}`, `dfrac`,
    degrees, `%`, `$`, a leading `x =`, thousands commas and trailing `.0` removed."""
    s = answer.strip()
    s = re.sub(r"\\(?:text|textbf|textit|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    for token in ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\%", "%", "$"):
        s = s.replace(token, "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[A-Za-z]=", "", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    return s


@functools.cache
def _math_verify():
    """The math_verify module, or None (with one warning) when it is not installed."""
    try:
        import math_verify
    except ImportError:
        warnings.warn(
            "math-verify is not installed: MATH answers are compared by normalised string equality only, "
            "which misses equivalent forms; `pip install math-verify[antlr4_13_2]` for symbolic checking",
            stacklevel=3,
        )
        return None
    return math_verify


def grade_math(prediction_text: str, gold_answer: str) -> bool:
    """True when the last `\\boxed{}` of the prediction equals the gold answer (string or math-verify)."""
    pred = extract_boxed(prediction_text)
    if pred is None:
        return False
    gold = str(gold_answer)
    if normalize_math_answer(pred) == normalize_math_answer(gold):
        return True
    mv = _math_verify()
    if mv is None:
        return False
    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = mv.parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
    pred_parsed = mv.parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
