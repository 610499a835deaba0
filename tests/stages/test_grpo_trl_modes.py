"""grpo.loss.mode gspo / gspo_token, cispo and sapo equal TRL GRPOTrainer's loss and gradient on identical tensors.

The inputs, the nova_rt side (the stage's `rl_loss_from_outputs` over micro-batches of whole groups) and the TRL
trainer stub come from test_grpo_trl_equivalence.py. Mappings (TRL 1.16 -> nova_rt):
  * importance_sampling_level="sequence" + loss_type grpo | bnpo | dapo | dr_grpo -> mode gspo (and gspo_token: the
    same value and gradient when the advantage is constant per response) with that loss_type's aggregation
  * loss_type="cispo", epsilon_high=c (the IS-weight cap) -> mode cispo, eps_high = c - 1, eps_low = 1 (no lower
    bound), agg token-mean (TRL normalises cispo by the accumulated batch's tokens, as dapo)
  * loss_type="sapo", sapo_temperature_pos/neg -> mode sapo, sapo_tau = [pos, neg], agg seq-mean-token-mean
Two oracles, as in test_grpo_trl_equivalence.py: TRL's math written out below (runs in CI) and TRL's own
`_compute_loss` (only where trl imports: .venv-bench).

Legend: B responses, L padded completion length, G group size.
"""

import math

import pytest
import torch

from nova_rt.stages.grpo import GRPOConfig, GRPODataConfig, GRPOLossConfig, SamplingConfig
from tests.helpers import assert_close_verbose
from tests.stages.test_grpo_trl_equivalence import (
    LOSS_TYPES,
    MAX_COMPLETION,
    _batch,
    _seed,
    _trl_trainer,
    nova_loss,
    trl_advantages,
)

CISPO_CAP = 1.28  # TRL's epsilon_high for cispo; _batch keeps ratios off 1.28
# (TRL loss_type, importance_sampling_level, nova mode, nova agg, TRL epsilon_low/high, nova eps_low/high)
CASES = [(t, "sequence", m, LOSS_TYPES[t], (0.05, 0.08), (0.05, 0.08)) for t in sorted(LOSS_TYPES)
         for m in ("gspo", "gspo_token")]
CASES += [("cispo", "token", "cispo", "token-mean", (0.2, CISPO_CAP), (1.0, CISPO_CAP - 1.0)),
          ("sapo", "token", "sapo", "seq-mean-token-mean", (0.2, 0.28), (0.2, 0.28))]
SAPO_TAUS = [(1.0, 1.05), (0.6, 2.0)]


def trl_mode_formula(lp_BL, old_BL, ref_BL, mask_BL, adv_B, loss_type, level, *, eps, beta, sapo_tau,
                     accumulated_tokens=None):
    """TRL 1.16's _compute_loss for these loss types, written out: the importance weight at the token or sequence
    level (masked mean of the log-ratios), the loss type's per-token term, + beta k3, its aggregation."""
    log_ratio = lp_BL - old_BL
    if level == "sequence":
        log_ratio = ((log_ratio * mask_BL).sum(-1) / mask_BL.sum(-1).clamp(min=1.0))[:, None]
    coef = torch.exp(log_ratio)
    a = adv_B[:, None]
    if loss_type == "cispo":
        per_tok = -torch.clamp(coef, max=eps[1]).detach() * a * lp_BL
    elif loss_type == "sapo":
        tau = torch.where(a > 0, sapo_tau[0], sapo_tau[1])
        per_tok = -torch.sigmoid(tau * (coef - 1)) * 4 / tau * a
    else:
        per_tok = -torch.minimum(coef * a, torch.clamp(coef, 1 - eps[0], 1 + eps[1]) * a)
    d = ref_BL - lp_BL
    per_tok = per_tok + beta * (torch.exp(d) - d - 1)
    masked = per_tok * mask_BL
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask_BL.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("dapo", "cispo"):
        return masked.sum() / (accumulated_tokens if accumulated_tokens is not None else mask_BL.sum())
    if loss_type == "bnpo":
        return masked.sum() / mask_BL.sum().clamp(min=1.0)
    return masked.sum() / (mask_BL.shape[0] * MAX_COMPLETION)  # dr_grpo


def _config(mode, agg, G, beta, eps, sapo_tau, loss_type) -> GRPOConfig:
    loss = GRPOLossConfig(mode=mode, agg=agg, adv_norm="std", beta=beta, kl="k3", kl_placement="loss",
                          eps_low=eps[0], eps_high=eps[1], sapo_tau=list(sapo_tau),
                          sum_norm_len=MAX_COMPLETION if loss_type == "dr_grpo" else 0)
    loss.validate()
    return GRPOConfig(sampling=SamplingConfig(group_size=G), data=GRPODataConfig(gym_tasks=[{"name": "x"}]), loss=loss)


def _draw():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    G = int(torch.randint(2, 6, (1,), generator=gen))
    batch = _batch(gen, n_prompts=4, G=G)
    # Rewards on a 1/8 grid: exact in fp32 and either equal or >= 1/8 apart within a group, so nova_rt's fp32
    # advantages and TRL's agree to rounding (two rewards 1e-3 apart would amplify fp32 rounding by ~1e3).
    batch["rewards_B"] = (batch["rewards_B"] * 8).round() / 8
    return seed, G, batch


def _nova(batch, G, mode, agg, beta, eps, tau, loss_type, n_micro):
    lp = batch["lp_BL"].float().requires_grad_()
    got = nova_loss(batch, lp, _config(mode, agg, G, beta, eps, tau, loss_type), n_micro)
    got.backward()
    return got, lp.grad


def _compare(got, grad, expect, expect_grad, mask, msg):
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1).float(), rtol=1e-5, atol=1e-7, name=msg)
    m = mask.bool()
    assert_close_verbose(grad[m], expect_grad[m].float(), rtol=1e-4, atol=1e-8, name=f"d logprobs {msg}")
    assert not grad[~m].any(), f"padding got a gradient: {msg}"


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_stage_mode_equals_trl_formula(case, beta):
    loss_type, level, mode, agg, trl_eps, nova_eps = case
    for tau in SAPO_TAUS if mode == "sapo" else SAPO_TAUS[:1]:
        seed, G, batch = _draw()
        n_micro = 1 if loss_type == "bnpo" else 2
        msg = f"seed {seed} {loss_type}/{level} -> {mode} beta={beta} tau={tau} G={G}"
        got, grad = _nova(batch, G, mode, agg, beta, nova_eps, tau, loss_type, n_micro)
        lp_ref = batch["lp_BL"].clone().requires_grad_()
        expect = trl_mode_formula(lp_ref, batch["old_BL"], batch["ref_BL"], batch["mask_BL"],
                                  trl_advantages(batch["rewards_B"], G), loss_type, level, eps=trl_eps, beta=beta,
                                  sapo_tau=tau)
        expect.backward()
        _compare(got, grad, expect, lp_ref.grad, batch["mask_BL"], msg)


def test_formula_spot_values():
    """The written-out formula on hand-computed one-token cases (G = 2, rewards (1, 0), A = +-a)."""
    lp = torch.tensor([[-1.0], [-2.0]], dtype=torch.float64)
    old = lp - torch.tensor([[0.5], [0.0]], dtype=torch.float64)  # ratios e^0.5 and 1
    mask = torch.ones(2, 1, dtype=torch.float64)
    adv = trl_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2)
    a = adv[0].item()
    kw = dict(beta=0.0, sapo_tau=(1.0, 2.0))
    cispo = trl_mode_formula(lp, old, lp, mask, adv, "cispo", "token", eps=(0.2, 1.28), **kw)
    assert abs(cispo.item() - (-1.28 * a * -1.0 + a * -2.0) / 2) < 1e-12  # -w A lp per token, token mean
    sapo = trl_mode_formula(lp, old, lp, mask, adv, "sapo", "token", eps=(0.2, 0.28), **kw)
    gate_pos = 4 / (1 + math.exp(-(math.exp(0.5) - 1)))  # tau_pos = 1 for A > 0: 4 sigmoid(r - 1)
    gate_neg = 0.5 * 4 / 2.0  # tau_neg = 2 for A < 0, r = 1: sigmoid(0) 4 / 2
    assert abs(sapo.item() - (-gate_pos * a + gate_neg * a) / 2) < 1e-12
    gspo = trl_mode_formula(lp, old, lp, mask, adv, "grpo", "sequence", eps=(0.2, 0.28), **kw)
    assert abs(gspo.item() - (-1.28 * a + a) / 2) < 1e-12  # one token: the sequence ratio is the token's


# ----------------------------------------------------------------------------------------------- TRL itself
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_stage_mode_equals_trl_grpo_trainer(case, beta):
    """TRL 1.16's own GRPOTrainer._compute_loss on the same tensors (skipped where trl is not installed: CI's .venv)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer",
                                   reason="trl is not installed here (it lives in .venv-bench: make bench-deps)")
    loss_type, level, mode, agg, trl_eps, nova_eps = case
    for tau in SAPO_TAUS if mode == "sapo" else SAPO_TAUS[:1]:
        seed, G, batch = _draw()
        n_micro = 1 if loss_type == "bnpo" else 2
        msg = f"seed {seed} TRL {loss_type}/{level} -> {mode} beta={beta} tau={tau} G={G}"
        B, L = batch["lp_BL"].shape
        adv_B = trl_advantages(batch["rewards_B"].float(), G)
        lp_trl = batch["lp_BL"].float().requires_grad_()
        trainer = _trl_trainer(trl_grpo, loss_type, beta, trl_eps[1], n_micro, lp_trl)
        trainer.epsilon_low, trainer.importance_sampling_level = trl_eps[0], level
        trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = tau
        mask = batch["mask_BL"]
        expect = 0.0
        bounds = torch.linspace(0, B // G, n_micro + 1).round().long().tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            rows = slice(a * G, b * G)
            n = (b - a) * G
            inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long),
                      "prompt_mask": torch.ones(n, 1, dtype=torch.long),
                      "completion_ids": torch.arange(B)[rows, None].expand(n, L).contiguous(),
                      "completion_mask": mask[rows].long(), "advantages": adv_B[rows],
                      "old_per_token_logps": batch["old_BL"][rows].float(),
                      "ref_per_token_logps": batch["ref_BL"][rows].float(), "num_items_in_batch": mask.sum()}
            expect = expect + trainer._compute_loss(None, inputs)
        expect.backward()
        got, grad = _nova(batch, G, mode, agg, beta, nova_eps, tau, loss_type, n_micro)
        _compare(got, grad, expect, lp_trl.grad, mask, msg)
