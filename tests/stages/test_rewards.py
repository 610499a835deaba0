"""Rewards (verifiers, format checks, reasoning-gym scorers, reward models, user functions, weighted combination) and
the RL prompt data (records, category sampler with resumable state, re-weighting rule)."""

import os
import random
import textwrap

import numpy as np
import pytest
import torch

from nova_rt.data.io import DataError, Row
from nova_rt.data.rl import CategorySampler, evaluate_categories, gym_prompts, reweight, row_to_prompt
from nova_rt.rewards import RewardError, build_reward
from nova_rt.rewards.math import answers_match, extract_answer, normalize_answer


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# ----------------------------------------------------------------------------------------------- math verifier
EXTRACT = [
    (" 45", "45"), ("The answer is 45. Thanks", "45"), ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("61-16", "16"), ("= -16", "-16"), ("#### 1,234\n", "1,234"), ("x = 3.50%", "3.50"), ("nothing here", None),
    ("first 3 then \\boxed{7} and 9", "7"), ("\\boxed{x^{2}+1}", "x^{2}+1"), ("Answer: -0.5", "-0.5"),
    ("", None), ("2 - -1 = 3", "3"), ("(-9) / 9 = -1.", "-1"), ("answer is 12\nlater 13", "12"),
]


@pytest.mark.parametrize("text, expect", EXTRACT)
def test_extract_answer(text, expect):
    assert extract_answer(text) == expect


MATCH = [("45", 45, True), ("45.0", "45", True), ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True),
         ("1,234", "1234", True), ("+7", "7", True), ("-3", "3", False), ("50%", "50", True), ("$12$", "12", True),
         ("\\dfrac{3}{4}", "0.75", True), ("3/4", "0.76", False), ("5 apples", "5", True), ("5 or 6", "5", False),
         ("X + 1", "x+1", True), ("1e3", "1000", True), ("\\text{yes}", "Yes", True), (None, "1", False),
         ("1/0", "1", False), ("", "0", False), ("12,34", "1234", False)]


@pytest.mark.parametrize("pred, ref, ok", MATCH)
def test_answers_match(pred, ref, ok):
    assert answers_match(pred, ref) is ok, (pred, ref, normalize_answer(pred) if pred is not None else None)


def test_random_integers_roundtrip_through_formats():
    seed = _seed()
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randint(-10**7, 10**7)
        text = rng.choice([f"The answer is {n:,}.", f"\\boxed{{{n}}}", f"so {n}", f"#### {n}", f"= {n}.0"])
        assert answers_match(extract_answer(text), n), f"seed {seed}: {text!r}"
        assert not answers_match(extract_answer(text), n + rng.choice([-1, 1])), f"seed {seed}: {text!r}"


# ----------------------------------------------------------------------------------------------- sources
def _samples(answers):
    return [{"answer": str(a), "category": "c", "messages": [{"role": "user", "content": "q"}], "prefill": ""}
            for a in answers]


def test_format_checks():
    texts = ["\\boxed{3}", " 42.", "The answer is 5", "no", "12 apples"]
    r = build_reward([{"type": "format", "check": "boxed"}, {"type": "format", "name": "num", "check": "number_only"},
                      {"type": "format", "name": "ans", "check": "answer_is"},
                      {"type": "format", "name": "rx", "check": "regex", "pattern": "^[0-9]+", "mode": "fullmatch"},
                      {"type": "format", "name": "short", "check": "max_chars", "max_chars": 3, "fail_score": -1}])
    _, per = r(texts, _samples([0] * 5))
    assert per["format"] == [1, 0, 0, 0, 0]
    assert per["num"] == [0, 1, 0, 0, 0]
    assert per["ans"] == [1, 0, 1, 0, 0]
    assert per["rx"] == [0, 0, 0, 0, 0]
    assert per["short"] == [-1, -1, -1, 1, -1]
    with pytest.raises(ValueError, match=r"grpo.rewards\[0\].*invalid regex"):
        build_reward([{"type": "format", "check": "regex", "pattern": "("}])


def test_weighted_combination_and_accuracy():
    seed = _seed()
    rng = random.Random(seed)
    answers = [rng.randint(-99, 99) for _ in range(20)]
    texts = [f"\\boxed{{{a}}}" if rng.random() < 0.5 else f"{a + 1}" for a in answers]
    w1, w2 = rng.uniform(0.1, 2), rng.uniform(-1, 1)
    r = build_reward([{"type": "math", "weight": w1}, {"type": "format", "check": "boxed", "weight": w2}])
    total, per = r(texts, _samples(answers))
    for i, t in enumerate(texts):
        boxed = t.startswith("\\boxed")
        assert per["math"][i] == float(boxed) and per["format"][i] == float(boxed)
        assert abs(total[i] - (w1 * boxed + w2 * boxed)) < 1e-12, f"seed {seed}"
    assert r.correctness(per) == per["math"] and r.verifiable
    assert not build_reward([{"type": "format"}]).verifiable


def test_user_function_loading_and_errors_name_the_source(tmp_path, monkeypatch):
    mod = tmp_path / "my_rewards.py"
    mod.write_text(textwrap.dedent("""
        def length(completions, samples, scale=1.0):
            return [scale * len(c) for c in completions]
        def boom(completions, samples):
            raise KeyError("missing thing")
        def short(completions, samples):
            return [1.0]
        def nan(completions, samples):
            return [float("nan")] * len(completions)
        def word(completions, samples):
            return ["high"] * len(completions)
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    texts = ["ab", "abcd", ""]
    r = build_reward([{"type": "user", "function": "my_rewards:length", "scale": 0.5, "weight": 2.0}])
    assert r(texts, _samples([1, 2, 3]))[0] == [2.0, 4.0, 0.0]
    r = build_reward([{"type": "user", "function": f"{mod}:length"}])  # a file path works too
    assert r(texts, _samples([1, 2, 3]))[0] == [2.0, 4.0, 0.0]
    for fn, match in [("boom", "'crash'.*KeyError.*missing thing"), ("short", "'crash' returned 1 scores for 3"),
                      ("nan", "'crash' returned nan"), ("word", "'crash' returned a non-number")]:
        r = build_reward([{"type": "user", "name": "crash", "function": f"my_rewards:{fn}"}])
        with pytest.raises(RewardError, match=match):
            r(texts, _samples([1, 2, 3]))
    for spec, match in [({"type": "user", "function": "my_rewards:NOT_CALLABLE"}, "no callable 'NOT_CALLABLE'"),
                        ({"type": "user", "function": "no_such_mod_xyz:f"}, "cannot import module"),
                        ({"type": "user", "function": "nocolon"}, "package.module:function"),
                        ({"type": "nope"}, "unknown reward type 'nope'"),
                        ({"type": "math", "bogus": 1}, r"grpo.rewards\[0\] \(type math\): bad options"),
                        ({"weight": 1}, "with a 'type' key")]:
        with pytest.raises(ValueError, match=match):
            build_reward([spec])
    with pytest.raises(ValueError, match="unique"):
        build_reward([{"type": "math"}, {"type": "math"}])
    r = build_reward([{"type": "math", "name": "verifier"}])
    with pytest.raises(RewardError, match="'verifier'.*no 'answer' field"):
        r(["1"], [{"category": "c"}])


def test_reasoning_gym_scorer_reward():
    recs = gym_prompts({"name": "basic_arithmetic", "size": 6, "seed": _seed() % 1000,
                        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
                        "prefill": "{metadata[expression]} ="}, "train", "sys")
    assert all(r["prefill"].endswith(" =") and r["messages"][0]["role"] == "system" for r in recs)
    r = build_reward([{"type": "reasoning_gym"}])
    right = [f" {rec['answer']}" for rec in recs]
    wrong = [f" {int(rec['answer']) + 1}" for rec in recs]
    assert r(right, recs)[0] == [1.0] * len(recs)
    assert all(v < 1.0 for v in r(wrong, recs)[0])
    with pytest.raises(RewardError, match="not a reasoning-gym task"):
        r(["1"], _samples([1]))


def test_reward_model_source_scores_like_the_model(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from nova_rt.models.tiny import byte_tokenizer

    torch.manual_seed(_seed())
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    samples = _samples([1, 2])
    samples[1]["prefill"] = "7 ="
    texts = [" 3", " 4"]
    r = build_reward([{"type": "reward_model", "path": str(tmp_path), "scale": 2.0, "shift": 0.5}])
    got = r(texts, samples)[0]
    for s, t, g in zip(samples, texts, got):
        msgs = s["messages"] + [{"role": "assistant", "content": s["prefill"] + t}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expect = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert abs(g - (2.0 * expect + 0.5)) < 1e-5
    with pytest.raises(ValueError, match="reward model directory not found"):
        build_reward([{"type": "reward_model", "path": str(tmp_path / "nope")}])


# ----------------------------------------------------------------------------------------------- RL data
def test_row_to_prompt_and_errors():
    rec = row_to_prompt(Row("f.jsonl", 3, {"prompt": "2+2?", "answer": 4, "prefill": "2+2 ="}), "be brief")
    assert rec["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    assert rec["answer"] == "4" and rec["category"] == "f" and rec["prefill"] == "2+2 ="
    for data, match in [({"answer": 1}, "row 3: field 'prompt'"), ({"prompt": "x", "answer": [1]}, "field 'answer'"),
                        ({"messages": [{"role": "assistant", "content": "a"}]}, "field 'messages'.*assistant"),
                        ({"prompt": "x", "category": ""}, "field 'category'"), ("text", "expected an object")]:
        with pytest.raises(DataError, match=match):
            row_to_prompt(Row("f.jsonl", 3, data))


def test_sampler_follows_weights_and_resumes_exactly():
    seed = _seed()
    pools = {c: [{"id": f"{c}{i}", "category": c} for i in range(n)] for c, n in [("a", 5), ("b", 17), ("c", 1)]}
    s = CategorySampler(pools, {"a": 1, "b": 3, "c": 0}, seed=seed)
    draws = [r["category"] for r in s.draw(4000)]
    assert "c" not in draws, f"seed {seed}"
    assert abs(draws.count("b") / 4000 - 0.75) < 0.04, f"seed {seed}"
    ids = [r["id"] for r in s.draw(34) if r["category"] == "b"]
    state = s.state_dict()
    after = [r["id"] for r in s.draw(50)]
    s2 = CategorySampler(pools, {"a": 1, "b": 3, "c": 0}, seed=seed + 1)
    s2.load_state_dict(state)
    assert [r["id"] for r in s2.draw(50)] == after, f"seed {seed}"
    assert len(ids) > 0
    with pytest.raises(ValueError, match="unknown categories"):
        CategorySampler(pools, {"zzz": 1.0})
    with pytest.raises(ValueError, match="data changed"):
        CategorySampler({"a": pools["a"]}).load_state_dict(state)


def test_reweight_rule_bounds_and_direction():
    seed = _seed()
    rng = np.random.default_rng(seed)
    cats = [f"c{i}" for i in range(5)]
    base = {c: w for c, w in zip(cats, rng.dirichlet(np.ones(5)))}
    acc = {c: float(a) for c, a in zip(cats, rng.uniform(0, 1, 5))}
    w = dict(base)
    for _ in range(30):  # converges to the target; every share stays within [base/R, base*R] after normalisation
        w = reweight(w, base, acc, max_ratio=4.0, rate=0.5)
    assert abs(sum(w.values()) - 1) < 1e-12
    ratio = {c: w[c] / base[c] for c in cats}
    order = sorted(cats, key=lambda c: acc[c])
    assert all(ratio[a] >= ratio[b] - 1e-9 for a, b in zip(order, order[1:])), f"seed {seed}: {ratio} {acc}"
    assert max(ratio.values()) / min(ratio.values()) <= 16 + 1e-9, f"seed {seed}"
    same = reweight(base, base, {c: 0.5 for c in cats})
    assert all(abs(same[c] - base[c]) < 1e-12 for c in cats), "equal accuracies keep the base shares"
    part = reweight(base, base, {"c0": 1.0})
    assert abs(part["c0"] - base["c0"]) < 1e-12, "a lone evaluated category keeps its share"


def test_evaluate_categories():
    pools = {"x": _samples([1, 2, 3]), "y": _samples([5])}
    res = evaluate_categories(pools, lambda chunk: [s["answer"] if s["answer"] != "2" else "0" for s in chunk],
                              lambda texts, samples: ([float(t == s["answer"]) for t, s in zip(texts, samples)], None),
                              batch=2)
    assert res == {"x": {"accuracy": 2 / 3, "reward": 2 / 3, "n": 3, "correct": [1.0, 0.0, 1.0]},
                   "y": {"accuracy": 1.0, "reward": 1.0, "n": 1, "correct": [1.0]}}


def test_evaluate_categories_split_over_ranks_matches_one_rank():
    seed = _seed()
    rng = random.Random(seed)
    pools = {c: _samples([rng.randint(0, 3) for _ in range(rng.randint(1, 9))]) for c in ("p", "q", "r")}
    score = lambda texts, samples: ([float(t == s["answer"]) for t, s in zip(texts, samples)], None)
    got = {}
    evaluate_categories(pools, lambda c: ["1"] * len(c), score, batch=2, rank=1, world=2,
                        reduce_sum=lambda xs: got.setdefault("r1", xs))
    both = evaluate_categories(pools, lambda c: ["1"] * len(c), score, batch=3, rank=0, world=2,
                               reduce_sum=lambda xs: [a + b for a, b in zip(xs, got["r1"])])
    ref = evaluate_categories(pools, lambda c: ["1"] * len(c), score, batch=5)
    assert both == ref, f"seed {seed}"  # per-prompt vectors included: each rank's positions land in pool order
    assert all(v["correct"] == [float(s["answer"] == "1") for s in pools[c]] for c, v in ref.items()), f"seed {seed}"
    assert all(v["n"] == len(pools[c]) for c, v in ref.items()), f"seed {seed}"
