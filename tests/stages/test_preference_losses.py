"""RM, DPO (sigmoid, label-smoothed), IPO losses and the pair statistics against independent scalar formulas.

The references below are written per pair with Python floats (math.log / math.exp, float64), not with the
library's tensor code, on random inputs drawn afresh each run; the seed is printed and in every message.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from nova_rt.losses.preference import (
    DPOLoss,
    RewardLoss,
    bradley_terry_mse_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    pair_stats,
    sequence_sums,
)

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_preference_losses seed: {SEED}")
PAIR_COUNTS = [1, 2, 7, 33, 128]


def _gen(extra: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + extra)


def _log_sigmoid(x: float) -> float:
    # log σ(x) = -log(1 + e^{-x}), written stably for both signs
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _close(actual: torch.Tensor, expected: list[float], what: str, tol: float = 1e-12) -> None:
    exp = torch.tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float64, what
    diff = (actual - exp).abs().max().item() if len(expected) else 0.0
    assert diff <= tol * max(1.0, exp.abs().max().item()), f"{what}: max diff {diff:.3e} (seed {SEED})"


@pytest.mark.parametrize("P", PAIR_COUNTS)
@pytest.mark.parametrize("alpha", [0.0, 0.37, 2.0])
def test_reward_loss_matches_formula(P, alpha):
    g = _gen(P)
    r = torch.randn(P, 2, generator=g, dtype=torch.float64) * 3
    s = torch.rand(P, 2, generator=g, dtype=torch.float64) * 2 - 0.5
    has = torch.rand(P, generator=g) < 0.5
    if P > 1:
        has[0], has[1] = True, False  # both kinds present whenever possible
    s_nan = torch.where(has[:, None], s, torch.full_like(s, float("nan")))  # unscored rows carry NaN, as collated
    out = RewardLoss(alpha)(r[:, 0], r[:, 1], s_nan, has)
    expected = []
    for i in range(P):
        rw, rl = r[i, 0].item(), r[i, 1].item()
        v = -_log_sigmoid(rw - rl)
        if has[i]:
            v += alpha * ((rw - s[i, 0].item()) ** 2 + (rl - s[i, 1].item()) ** 2)
        expected.append(v)
    assert torch.isfinite(out).all(), f"NaN leaked from unscored rows (seed {SEED})"
    _close(out, expected, f"rm loss P={P} alpha={alpha}")


def test_reward_loss_without_scores_is_bradley_terry():
    g = _gen(1)
    r = torch.randn(9, 2, generator=g, dtype=torch.float64)
    s = torch.randn(9, 2, generator=g, dtype=torch.float64)
    none = torch.zeros(9, dtype=torch.bool)
    with_alpha = bradley_terry_mse_loss(r[:, 0], r[:, 1], s[:, 0], s[:, 1], none, alpha=5.0)
    _close(with_alpha, [-_log_sigmoid(a - b) for a, b in r.tolist()], "alpha ignored without scores")


def test_reward_loss_gradient_matches_formula():
    g = _gen(2)
    P, alpha = 11, 0.7
    r = (torch.randn(P, 2, generator=g, dtype=torch.float64)).requires_grad_()
    s = torch.randn(P, 2, generator=g, dtype=torch.float64)
    has = torch.rand(P, generator=g) < 0.5
    RewardLoss(alpha)(r[:, 0], r[:, 1], s, has).sum().backward()
    for i in range(P):
        d = r[i, 0].item() - r[i, 1].item()
        sig_neg = 1.0 / (1.0 + math.exp(d))  # σ(-d) = -d/dd log σ(d)
        gw, gl = -sig_neg, sig_neg
        if has[i]:
            gw += 2 * alpha * (r[i, 0].item() - s[i, 0].item())
            gl += 2 * alpha * (r[i, 1].item() - s[i, 1].item())
        assert abs(r.grad[i, 0].item() - gw) < 1e-12 and abs(r.grad[i, 1].item() - gl) < 1e-12, \
            f"pair {i} grad {r.grad[i].tolist()} vs {(gw, gl)} (seed {SEED})"


def _random_logps(P: int, extra: int):
    g = _gen(extra)
    pol = -torch.rand(P, 2, generator=g, dtype=torch.float64) * 80
    ref = pol + torch.randn(P, 2, generator=g, dtype=torch.float64) * 4
    return pol, ref


@pytest.mark.parametrize("P", PAIR_COUNTS)
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_sigmoid_matches_formula(P, beta, eps):
    pol, ref = _random_logps(P, P * 7 + int(beta * 100))
    loss, rc, rr = DPOLoss(beta=beta, loss_type="sigmoid", label_smoothing=eps)(pol[:, 0], pol[:, 1], ref[:, 0],
                                                                                  ref[:, 1])
    exp_loss, exp_rc, exp_rr = [], [], []
    for i in range(P):
        cw = pol[i, 0].item() - ref[i, 0].item()
        cl = pol[i, 1].item() - ref[i, 1].item()
        z = beta * (cw - cl)
        exp_loss.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))
        exp_rc.append(beta * cw)
        exp_rr.append(beta * cl)
    _close(loss, exp_loss, f"dpo P={P} beta={beta} eps={eps}")
    _close(rc, exp_rc, "chosen rewards")
    _close(rr, exp_rr, "rejected rewards")


@pytest.mark.parametrize("P", PAIR_COUNTS)
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_ipo_matches_formula(P, beta):
    pol, ref = _random_logps(P, P * 13 + int(beta * 100))
    loss, _, _ = DPOLoss(beta=beta, loss_type="ipo")(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1])
    expected = [((pol[i, 0].item() - ref[i, 0].item()) - (pol[i, 1].item() - ref[i, 1].item()) - 1 / (2 * beta)) ** 2
                for i in range(P)]
    _close(loss, expected, f"ipo P={P} beta={beta}", tol=1e-11)


def test_dpo_sigmoid_gradient_and_extremes():
    # d loss / d h = -β[(1 - ε) σ(-βh) - ε σ(βh)]; also no overflow at |βh| ~ 1e3
    g = _gen(3)
    h = (torch.randn(20, generator=g, dtype=torch.float64) * 30).requires_grad_()
    beta, eps = 0.2, 0.15
    dpo_sigmoid_loss(h, beta, eps).sum().backward()
    for i, hv in enumerate(h.tolist()):
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        expected = -beta * ((1 - eps) * sig(-beta * hv) - eps * sig(beta * hv))
        assert abs(h.grad[i].item() - expected) < 1e-12, f"h={hv}: {h.grad[i].item()} vs {expected} (seed {SEED})"
    big = torch.tensor([5e3, -5e3], dtype=torch.float64)
    out = dpo_sigmoid_loss(big, 1.0, 0.0)
    assert torch.isfinite(out).all() and out[0].item() < 1e-300 and abs(out[1].item() - 5e3) < 1e-9
    assert torch.isfinite(ipo_loss(big, 0.1)).all()


@pytest.mark.parametrize("P", [1, 5, 64])
def test_pair_stats_are_weighted_means(P):
    g = _gen(P + 99)
    rc = torch.randn(P, generator=g, dtype=torch.float64)
    rr = torch.randn(P, generator=g, dtype=torch.float64)
    if P > 2:
        rr[0] = rc[0]  # a tie counts one half
    split = max(1, P // 2)  # two micro-batches of one global batch: sums of weighted stats are global means
    w = 1.0 / P
    a, b = pair_stats(rc[:split], rr[:split], w), pair_stats(rc[split:], rr[split:], w)
    total = {k: a[k] + b[k] for k in a}
    acc = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(rc.tolist(), rr.tolist())) / P
    assert abs(total["accuracy"] - acc) < 1e-12, f"seed {SEED}"
    assert abs(total["reward_chosen"] - sum(rc.tolist()) / P) < 1e-12
    assert abs(total["reward_rejected"] - sum(rr.tolist()) / P) < 1e-12
    assert abs(total["margin"] - (sum(rc.tolist()) - sum(rr.tolist())) / P) < 1e-12


@pytest.mark.parametrize("lens", [[1], [3, 1, 4], [1, 1, 1, 1], [17, 2, 9, 1, 30, 5]])
def test_sequence_sums_match_loop(lens):
    g = _gen(sum(lens))
    vals = torch.randn(sum(lens), generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    out = sequence_sums(vals, cu)
    expected, o = [], 0
    for n in lens:
        expected.append(sum(vals[o:o + n].tolist()))
        o += n
    _close(out, expected, f"sequence sums {lens}")
    out.sum().backward()
    assert torch.equal(vals.grad, torch.ones_like(vals))
