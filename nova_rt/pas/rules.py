"""Reject rules for generated complements, checked in code after the LLM critique (method-spec §2, "Filtering").

A complement is rejected when it is empty; malformed (garbled output of a broken or tiny generator); too long
(`max_words`, CJK characters count as words, or more than 4 lines); a copy of the prompt (word Jaccard >=
`max_prompt_overlap`); in another language than the prompt (Unicode script, or Latin stop words); an answer rather
than a complement (answer openers, code, a computed "= 42" the prompt does not contain, > 3 numbered steps); or
drifting from the intent (a semantic embedder places it closer to a prompt of another category than to its own by
more than `drift_margin` in cosine; skipped with the hashed n-gram embedder, which cannot tell topics apart).

Each rule's exact thresholds, and how drift_margin's default 0.3 was measured: docs/stages.md#pas-reject-rules.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?|\d+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_OPENERS = re.compile(
    r"^\W*(sure\b|certainly\b|of course\b|absolutely\b|here(?:'s| is| are)\b|the answer\b|answer\s*:|"
    r"solution\s*:|yes[,.!]|no[,.!]|i(?:'d| would) be (?:happy|glad)|great question|let me\b|let's\b|"
    r"i think\b|i(?:'m| am) going to\b|i will\b|once upon a time\b|dear\b|subject\s*:)",
    re.IGNORECASE)
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import|#include|SELECT |function |public |"
                        r"for \(|while \(|return |console\.log|print\()", re.MULTILINE)
_RESULT = re.compile(r"(?<![<>!=])=\s*-?\$?\d")
_NUMBERED = re.compile(r"^\s*(?:step\s*)?\d+[.):]\s", re.MULTILINE | re.IGNORECASE)

STOPWORDS = {
    "en": ("the and is are to of in that it for you with this on be what how your as can do not or should an "
           "about at from by my if when which who will its their than them they each any all into more why we "
           "write explain draft create give make tell please solve find prove compute").split(),
    "es": "el la los las de que en un una es por para con no se su al lo como más pero del muy qué cómo "
          "escribe explica dame".split(),
    "fr": "le la les de des et est un une que pour dans ce qui en pas sur vous avec au du pourquoi comment "
          "écris explique décris".split(),
    "de": "der die das und ist nicht ein eine zu den mit von für auf sie es ich sich dem wie warum was "
          "schreibe erkläre beschreibe".split(),
    "it": "il lo la gli le di che un una per non sono con del della è come anche più si perché scrivi spiega "
          "descrivi".split(),
    "pt": "os as de que um uma para com não em do da é se por mais como porque escreva explique descreva".split(),
    "nl": "de het een en van is dat niet op te zijn voor met die je ook als aan er waarom hoe wat schrijf "
          "leg beschrijf".split(),
}


def words(text: str) -> list[str]:
    """Words of `text`, lowercased; every CJK character is one word."""
    out = []
    for w in _WORD.findall(text.lower()):
        out.extend(_CJK.findall(w) if _CJK.search(w) else [w])
    return out


def dominant_script(text: str) -> str | None:
    """The script most letters belong to (LATIN, CYRILLIC, CJK, ARABIC, ...), or None without letters."""
    counts: Counter = Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        if _CJK.match(ch) or name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")):
            counts["CJK"] += 1
        elif name:
            counts[name.split()[0]] += 1
    return counts.most_common(1)[0][0] if counts else None


def latin_language(text: str, min_hits: int = 2) -> str | None:
    """Stop-word language guess for Latin-script text; None when too few stop words or a tie."""
    ws = words(text)
    scores = sorted(((sum(w in set(sw) for w in ws), lang) for lang, sw in STOPWORDS.items()), reverse=True)
    (best, lang), (second, _) = scores[0], scores[1]
    return lang if best >= min_hits and best > second else None


def is_other_language(prompt: str, complement: str) -> bool:
    sp, sc = dominant_script(prompt), dominant_script(complement)
    if sp is None or sc is None:
        return False
    if sp != sc:
        return True
    if sp == "LATIN":
        lp, lc = latin_language(prompt, min_hits=1), latin_language(complement)  # prompts are often very short
        return lp is not None and lc is not None and lp != lc
    return False


def answers_prompt(prompt: str, complement: str) -> bool:
    if _OPENERS.search(complement) or "```" in complement or _CODE_LINE.search(complement):
        return True
    if len(_NUMBERED.findall(complement)) > 3:
        return True
    # "= 42" is a computed result unless the prompt itself has "= 42" (a complement may quote the equation)
    quoted = {m.group(0).replace(" ", "") for m in _RESULT.finditer(prompt)}
    return any(m.group(0).replace(" ", "") not in quoted for m in _RESULT.finditer(complement))


def prompt_overlap(prompt: str, complement: str) -> float:
    a, b = set(words(prompt)), set(words(complement))
    return len(a & b) / len(a | b) if a | b else 0.0


class DriftChecker:
    """Flags complements closer to another category's prompts than to their own prompt (see module docstring)."""

    def __init__(self, embedder, pool_texts: Sequence[str], pool_categories: Sequence[str], margin: float = 0.3):
        self.embedder, self.margin = embedder, margin
        self.pool_ND = embedder.encode(list(pool_texts)) if len(pool_texts) else np.zeros((0, 1), np.float32)
        self.pool_cat = np.asarray(list(pool_categories), dtype=object)

    def gap(self, prompt: str, category: str, complement: str) -> float:
        """max cos(complement, other-category prompt) - cos(complement, prompt); -inf without such prompts."""
        others = self.pool_ND[self.pool_cat != category]
        if others.shape[0] == 0:
            return float("-inf")
        p_D, c_D = self.embedder.encode([prompt, complement])
        return float((others @ c_D).max() - p_D @ c_D)

    def drifts(self, prompt: str, category: str, complement: str) -> bool:
        return self.gap(prompt, category, complement) > self.margin


def is_malformed(text: str) -> bool:
    if len(words(text)) < 3 or "\ufffd" in text:
        return True
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in text):
        return True
    visible = [ch for ch in text if not ch.isspace()]
    return sum(ch.isalpha() for ch in visible) < 0.5 * len(visible)


def check_complement(prompt: str, complement: str, *, max_words: int = 60, max_prompt_overlap: float = 0.8,
                     category: str = "", drift: DriftChecker | None = None) -> list[str]:
    """Names of the rules `complement` breaks (empty list: it passes)."""
    text = complement.strip()
    if not text:
        return ["empty"]
    if is_malformed(text):
        return ["malformed"]
    reasons = []
    if len(words(text)) > max_words or text.count("\n") >= 4:
        reasons.append("too_long")
    if prompt_overlap(prompt, text) >= max_prompt_overlap:
        reasons.append("copies_prompt")
    if is_other_language(prompt, text):
        reasons.append("other_language")
    if answers_prompt(prompt, text):
        reasons.append("answers_prompt")
    if drift is not None and drift.drifts(prompt, category, text):
        reasons.append("drifts_from_intent")
    return reasons
