"""Best-fit-decreasing packing, utilization on a long-tailed mix, and the deterministic batch schedule."""

import numpy as np
import pytest

from nova_rt.data.chat import Sample
from nova_rt.data.packing import BatchSchedule, best_fit_decreasing, collate, loss_weights, pack_samples


def _long_tailed(rng, n, cap):
    return np.clip(rng.lognormal(mean=4.5, sigma=0.9, size=n).astype(int) + 1, 1, cap).tolist()


@pytest.mark.parametrize("cap", [512, 1000, 4096])
def test_bfd_valid_and_dense(cap):
    rng = np.random.default_rng()
    lengths = _long_tailed(rng, 3000, cap)
    bins = best_fit_decreasing(lengths, cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    util = sum(lengths) / (len(bins) * cap)
    lower_bound = int(np.ceil(sum(lengths) / cap))
    assert len(bins) <= lower_bound + 2, (len(bins), lower_bound)
    assert util >= 0.98, util


def test_bfd_rejects_oversized():
    with pytest.raises(ValueError, match="max_tokens=8"):
        best_fit_decreasing([3, 9], 8)


def _samples(rng, lengths):
    out = []
    for n in lengths:
        ids = rng.integers(0, 100, size=n)
        tg = np.where(rng.random(n) < 0.6, rng.integers(0, 100, size=n), -100)
        tg[-1] = -100
        out.append(Sample(ids, tg))
    return out


def test_rows_and_collate():
    rng = np.random.default_rng()
    lengths = [1, 1, 7, 33, 2, 19, 64, 5]
    rows, util = pack_samples(_samples(rng, lengths), 64)
    assert sum(r.num_tokens for r in rows) == sum(lengths)
    for r in rows:
        docs = np.diff(r.cu_seqlens)
        assert r.cu_seqlens[0] == 0 and r.cu_seqlens[-1] == r.num_tokens and (docs > 0).all()
        for a, b in zip(r.cu_seqlens[:-1], r.cu_seqlens[1:]):
            assert (r.position_ids[a:b] == np.arange(b - a)).all()
    b = collate(rows, loss_weights(rows, "token"))
    assert b["input_ids"].shape == (1, sum(lengths)) and b["cu_seqlens"][-1] == sum(lengths)
    assert b["max_seqlen"] == 64
    assert abs(float(b["weights"].sum()) - 1.0) < 1e-6


def test_sequence_weights_average_per_sample():
    rng = np.random.default_rng()
    rows, _ = pack_samples(_samples(rng, [5, 9, 3, 12, 1]), 16)
    ws = loss_weights(rows, "sequence")
    n_with_targets = sum(
        1 for r in rows for a, b in zip(r.cu_seqlens[:-1], r.cu_seqlens[1:]) if (r.targets[a:b] != -100).any())
    total = sum(w.sum() for w in ws)
    assert abs(total - 1.0) < 1e-9 and n_with_targets > 0
    for r, w in zip(rows, ws):
        for a, b in zip(r.cu_seqlens[:-1], r.cu_seqlens[1:]):
            m = r.targets[a:b] != -100
            if m.any():
                assert np.allclose(w[a:b][m], 1.0 / (m.sum() * n_with_targets))


def test_schedule_is_a_function_of_step():
    s1 = BatchSchedule(40, 8, 2, 2, seed=3)
    s2 = BatchSchedule(40, 8, 2, 2, seed=3)
    seen = []
    for step in range(5):
        g = s1.global_rows(step)
        assert len(set(g.tolist())) == 8
        seen.extend(g.tolist())
        assert (s2.global_rows(step) == g).all()
        mbs = s1.rank_micro_batches(step, 0) + s1.rank_micro_batches(step, 1)
        assert sorted(np.concatenate(mbs).tolist()) == sorted(g.tolist())
    assert sorted(seen) == list(range(40))  # one epoch covers every row once
    assert not (s1.global_rows(5) == s1.global_rows(0)).all()  # next epoch reshuffled
    with pytest.raises(ValueError, match="divisible"):
        BatchSchedule(40, 6, 4, 1, seed=0)
