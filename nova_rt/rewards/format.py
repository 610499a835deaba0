"""Format checks: reward responses whose shape is right, independently of whether the answer is.

Checks (`check:`):
    boxed        the response contains a non-empty \\boxed{...}
    number_only  the response (stripped, a trailing "." allowed) is a single number
    answer_is    an explicit final answer is present: \\boxed{}, "answer is/:" or "####"
    regex        `pattern` matches (`mode: search` anywhere, `fullmatch` the whole stripped response)
    max_chars    the response has at most `max_chars` characters (penalise rambling)
A passing response scores `score`, a failing one `fail_score`.
"""

from __future__ import annotations

import re

from nova_rt.rewards import register_reward
from nova_rt.rewards.math import _ANSWER_IS_RE, _HASH_RE, _NUMBER_RE, last_boxed

CHECKS = ("boxed", "number_only", "answer_is", "regex", "max_chars")


def _number_only(text: str) -> bool:
    s = text.strip().rstrip(".").strip()
    return bool(s) and _NUMBER_RE.fullmatch(s) is not None


def _boxed(text: str) -> bool:
    b = last_boxed(text)
    return b is not None and bool(b.strip())


def make_check(check: str, pattern: str | None = None, mode: str = "search", flags: str = "",
               max_chars: int | None = None):
    """A predicate text -> bool for one of CHECKS (see the module docstring)."""
    if check == "boxed":
        return _boxed
    if check == "number_only":
        return _number_only
    if check == "answer_is":
        return lambda t: _boxed(t) or _ANSWER_IS_RE.search(t) is not None or _HASH_RE.search(t) is not None
    if check == "regex":
        if not pattern:
            raise ValueError("check 'regex' needs a non-empty `pattern`")
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"mode must be 'search' or 'fullmatch', got {mode!r}")
        bad = set(flags) - set("imsx")
        if bad:
            raise ValueError(f"flags may contain i, m, s, x; got {flags!r}")
        fl = 0
        for ch in flags:
            fl |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}[ch]
        try:
            rx = re.compile(pattern, fl)
        except re.error as exc:
            raise ValueError(f"invalid regex pattern {pattern!r}: {exc}") from None
        if mode == "search":
            return lambda t: rx.search(t) is not None
        return lambda t: rx.fullmatch(t.strip()) is not None
    if check == "max_chars":
        if not isinstance(max_chars, int) or max_chars < 0:
            raise ValueError(f"check 'max_chars' needs max_chars >= 0, got {max_chars!r}")
        return lambda t: len(t) <= max_chars
    raise ValueError(f"unknown format check {check!r} (known: {', '.join(CHECKS)})")


@register_reward("format")
def format_reward(check: str = "answer_is", pattern: str | None = None, mode: str = "search", flags: str = "",
                  max_chars: int | None = None, score: float = 1.0, fail_score: float = 0.0):
    ok = make_check(check, pattern, mode, flags, max_chars)

    def reward(completions: list[str], samples: list[dict]) -> list[float]:
        return [score if ok(t) else fail_score for t in completions]

    return reward
