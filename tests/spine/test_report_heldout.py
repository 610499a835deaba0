"""The report's held-out comparisons (nova_rt.report): the paired NLL change and its standard error against
independent computations, and the verdicts at the 2-s.e. boundary."""

import math

import numpy as np
import pytest

from nova_rt.report import accuracy_change_se, paired_accuracy_change, paired_nll_change, verdict


def _docs(rng, n, tokens):
    return np.stack([rng.gamma(2.0, 1.0, n) * tokens, tokens], axis=1)


@pytest.mark.parametrize("n", [2, 3, 17, 64])
def test_equal_lengths_reduce_to_per_document_mean(n):
    """With every document t tokens long, the change is the mean per-token change of the documents and its s.e.
    is the textbook one of a mean: std(ddof=1) / sqrt(n)."""
    rng = np.random.default_rng(n)
    t = np.full(n, 7.0)
    a, b = _docs(rng, n, t), _docs(rng, n, t)
    change, se = paired_nll_change(a.tolist(), b.tolist())
    per_doc = (b[:, 0] - a[:, 0]) / t
    assert change == pytest.approx(per_doc.mean(), rel=1e-12)
    assert se == pytest.approx(per_doc.std(ddof=1) / math.sqrt(n), rel=1e-10)


def test_ragged_lengths_match_the_token_weighted_change_and_a_bootstrap():
    rng = np.random.default_rng(0)
    n = 200
    t = rng.integers(1, 90, n).astype(float)  # length-1 documents included
    a = _docs(rng, n, t)
    b = a.copy()
    b[:, 0] = a[:, 0] * rng.uniform(0.6, 1.1, n)
    change, se = paired_nll_change(a.tolist(), b.tolist())
    assert change == pytest.approx(b[:, 0].sum() / t.sum() - a[:, 0].sum() / t.sum(), rel=1e-12)
    idx = rng.integers(0, n, (4000, n))  # resample documents: the spread of the token-weighted change
    boot = (b[idx, 0].sum(1) - a[idx, 0].sum(1)) / t[idx].sum(1)
    assert se == pytest.approx(boot.std(), rel=0.1)


def test_unpaired_inputs_are_refused():
    a = [[3.0, 2.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="same documents"):
        paired_nll_change(a, [[3.0, 2.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="same documents"):
        paired_nll_change(a, [[3.0, 2.0]])


def test_one_document_has_no_error_estimate():
    change, se = paired_nll_change([[4.0, 2.0]], [[3.0, 2.0]])
    assert change == -0.5 and math.isnan(se)
    assert verdict(change, se, higher_is_better=False) == "too few items to tell"


def test_verdicts_at_the_two_se_boundary():
    assert verdict(-0.21, 0.1, higher_is_better=False).startswith("better")
    assert verdict(-0.19, 0.1, higher_is_better=False) == "**no change beyond noise**"
    assert verdict(0.21, 0.1, higher_is_better=False).startswith("**worse**")
    assert verdict(0.21, 0.1, higher_is_better=True).startswith("better")
    assert verdict(-0.21, 0.1, higher_is_better=True).startswith("**worse**")


def test_accuracy_change_se():
    assert accuracy_change_se(0.5, 0.5, 100, 100) == pytest.approx(math.sqrt(0.005))
    assert accuracy_change_se(0.25, 0.75, 48, 24) == pytest.approx(math.sqrt(0.1875 / 48 + 0.1875 / 24))
    assert accuracy_change_se(0.0, 1.0, 10, 10) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_paired_accuracy_change_matches_discordant_pair_counts(seed):
    """McNemar's view: only prompts that flipped carry the change; b went 0 -> 1, c went 1 -> 0 over n prompts,
    change = (b - c) / n and the per-prompt differences have variance (b + c) / n - change^2."""
    rng = np.random.default_rng(seed)
    cats = {f"c{i}": int(rng.integers(1, 40)) for i in range(int(rng.integers(1, 4)))}
    before = {c: rng.integers(0, 2, n).astype(float).tolist() for c, n in cats.items()}
    after = {c: rng.integers(0, 2, n).astype(float).tolist() for c, n in cats.items()}
    pairs = [(b, a) for c in cats for b, a in zip(before[c], after[c])]
    n = len(pairs)
    b = sum(1 for x, y in pairs if (x, y) == (0, 1))
    c = sum(1 for x, y in pairs if (x, y) == (1, 0))
    change, se = paired_accuracy_change(before, after)
    assert change == pytest.approx((b - c) / n, abs=1e-12)
    assert se == pytest.approx(math.sqrt(n / (n - 1) * ((b + c) / n - ((b - c) / n) ** 2) / n), rel=1e-9)


def test_paired_accuracy_change_refuses_other_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        paired_accuracy_change({"a": [1.0, 0.0]}, {"a": [1.0]})
    with pytest.raises(ValueError, match="same prompts"):
        paired_accuracy_change({"a": [1.0]}, {"b": [1.0]})
