"""Math verifier: pull the final answer out of a response and compare it with the reference after normalisation.

Extraction, first match wins (so an explicit final answer beats numbers in the working):
    1. the last \\boxed{...} (or \\fbox{...}), braces balanced;
    2. the text after the last "answer is" / "answer:" / "Answer =" (up to the end of that line or sentence);
    3. the text after the last "####" (GSM8K style);
    4. the last number in the text (a leading minus counts only when no digit or ')' precedes it, so "61-16"
       yields 16 and "= -16" yields -16).
Comparison: both sides are normalised (dollar signs, \\text{}, \\left/\\right, \\frac{a}{b} and \\dfrac -> a/b,
thousands separators "1,234", a leading "+", a trailing "." or "%", surrounding spaces). When both parse as exact
rationals (integers, decimals, a/b, scientific notation) they are compared as fractions.Fraction, so 0.5 == 1/2
== 0.50 == \\frac{1}{2}; otherwise the normalised strings are compared case-insensitively without spaces.
"""

from __future__ import annotations

import re
from fractions import Fraction

from nova_rt.rewards import register_reward

_NUMBER = r"(?:(?<![\d)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?:(?<![\d)\]])-)?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_HASH_RE = re.compile(r"####\s*(.+?)\s*(?:\n|$)")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def extract_answer(text: str) -> str | None:
    """The final answer of a response (see the module docstring for the order), or None when there is none."""
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    hits = list(_ANSWER_IS_RE.finditer(text))
    if hits:
        ans = _SENTENCE_END_RE.split(hits[-1].group(1), maxsplit=1)[0].strip()
        if ans:
            return ans
    hits = list(_HASH_RE.finditer(text))
    if hits:
        return hits[-1].group(1).strip()
    return last_number(text)


def normalize_answer(ans: str) -> str:
    """Canonical string form of an answer (LaTeX wrappers, separators and decoration removed)."""
    s = str(ans).strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "").replace("$", "")
    s = _TEXT_RE.sub(r"\1", s)
    for _ in range(3):  # nested fractions unwrap from the inside out
        s = _FRAC_RE.sub(r"(\1)/(\2)", s)
    s = s.strip().rstrip(".").strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    if s.startswith("+"):
        s = s[1:]
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = re.sub(r"\(\s*(-?\d+)\s*\)", r"\1", s)  # "(3)/(4)" -> "3/4"
    return re.sub(r"\s+", "", s)


def to_fraction(s: str) -> Fraction | None:
    """An exact rational for a normalised answer ("-12", "0.50", "3/4", "1e3"), or None."""
    try:
        if "/" in s:
            num, den = s.split("/")
            den_f = Fraction(den)
            return Fraction(num) / den_f if den_f != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, reference) -> bool:
    """True when `predicted` equals `reference` after normalisation (numerically when both are numbers)."""
    if predicted is None or reference is None:
        return False
    p, r = normalize_answer(predicted), normalize_answer(str(reference))
    if not p:
        return False
    fp, fr = to_fraction(p), to_fraction(r)
    if fp is not None and fr is not None:
        return fp == fr
    if fr is not None and fp is None:  # "x = 5" or "5 apples": fall back to the last number of the prediction
        num = last_number(p)
        fn = to_fraction(normalize_answer(num)) if num is not None else None
        return fn is not None and fn == fr and len(_NUMBER_RE.findall(p)) == 1
    return p.lower() == r.lower()


@register_reward("math")
def math_reward(correct: float = 1.0, wrong: float = 0.0, answer_field: str = "answer"):
    """Verifier reward: `correct` when the extracted answer equals sample[answer_field], else `wrong`."""

    def score(completions: list[str], samples: list[dict]) -> list[float]:
        out = []
        for i, (text, sample) in enumerate(zip(completions, samples)):
            if answer_field not in sample or sample[answer_field] is None:
                raise ValueError(f"sample {i} (category {sample.get('category')!r}) has no '{answer_field}' field "
                                 "to verify against")
            out.append(correct if answers_match(extract_answer(text), sample[answer_field]) else wrong)
        return out

    return score
