"""nova_rt's GRPO loss and its gradient equal TRL GRPOTrainer's on identical inputs, for every aggregation both have.

Same inputs for both sides: a padded (B, L) batch of per-token log-probs of the current policy (a leaf tensor, so
d loss / d logprobs is compared), the rollout policy's ("old") and the reference's log-probs, a completion mask, and
the sequence rewards of B = prompts x G responses. The nova_rt side is the GRPO stage's own loss path
(`rl_loss_from_outputs` on micro-batches built with the stage's aggregation factors, so splitting a rollout batch
into micro-batches is part of what is checked); it computes the group advantages from the rewards itself.

Two oracles:
  * `trl_formula_loss`: TRL's documented GRPO math written out here (runs in CI, whose .venv has no TRL):
        A_i  = (R_i - mean_g R) / (std_g R + 1e-4)      scale_rewards="group", std with Bessel's correction
        r_t  = exp(lp_t - old_t)
        l_t  = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)  + beta (exp(ref_t - lp_t) - (ref_t - lp_t) - 1)
        "grpo":    mean_i (sum_t l_t / |o_i|)
        "bnpo":    sum_{i,t} l_t / sum_i |o_i|                     (the micro-batch's tokens)
        "dapo":    sum_{i,t} l_t / sum_i |o_i|                     (the whole accumulated batch's tokens)
        "dr_grpo": sum_{i,t} l_t / (B max_completion_length)
  * TRL itself (`GRPOTrainer._compute_loss` of trl 1.16.0, only where trl imports, i.e. in .venv-bench): the same
    tensors are fed through a GRPOTrainer whose log-prob function returns the given leaf.

The aggregation names map as: grpo <-> seq-mean-token-mean; bnpo, dapo <-> token-mean (bnpo only for one
micro-batch: TRL normalises it per micro-batch); dr_grpo <-> seq-mean-token-sum-norm with grpo.loss.sum_norm_len =
max_completion_length (the constant of Dr. GRPO; nova_rt's default 0 uses the batch's longest response instead).

Legend: B responses, L padded completion length, T response tokens (flat), G group size.
"""

import os
from dataclasses import replace

import pytest
import torch

from nova_rt.stages.grpo import (
    GRPOConfig,
    GRPODataConfig,
    GRPOLossConfig,
    RolloutBatch,
    SamplingConfig,
    agg_scale_and_weights,
    agg_totals,
    rl_loss_from_outputs,
)
from tests.helpers import assert_close_verbose

LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
              "dr_grpo": "seq-mean-token-sum-norm"}
MAX_COMPLETION = 12


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _batch(gen, n_prompts: int, G: int) -> dict:
    """Padded inputs: lengths 1..MAX_COMPLETION - 4 (TRL's completions hold at least the EOS token; none reaches the
    budget, so dr_grpo's constant differs from the longest response), ratios in about [0.5, 2] so both clip sides
    are active, one group with equal rewards, values kept off the clip edges."""
    B = n_prompts * G
    len_B = torch.randint(1, MAX_COMPLETION - 3, (B,), generator=gen)
    L = int(len_B.max())
    mask_BL = (torch.arange(L)[None, :] < len_B[:, None]).float()
    lp_BL = -3 * torch.rand(B, L, generator=gen, dtype=torch.float64)
    log_ratio = 1.4 * torch.rand(B, L, generator=gen, dtype=torch.float64) - 0.7
    for edge in (0.8, 1.2, 1.28):  # keep r off the clip boundaries, where fp32 and fp64 may take different sides
        near = (log_ratio.exp() - edge).abs() < 2e-3
        log_ratio[near] += 5e-3
    old_BL = lp_BL - log_ratio
    ref_BL = lp_BL + 0.5 * torch.randn(B, L, generator=gen, dtype=torch.float64)
    rewards_B = torch.randint(0, 3, (B,), generator=gen).double() / 2 + 0.1 * torch.rand(B, generator=gen)
    rewards_B[:G] = rewards_B[0]  # a group with no signal: advantage 0
    return {"len_B": len_B, "mask_BL": mask_BL, "lp_BL": lp_BL, "old_BL": old_BL, "ref_BL": ref_BL,
            "rewards_B": rewards_B, "G": G}


def trl_advantages(rewards_B: torch.Tensor, G: int) -> torch.Tensor:
    r_PG = rewards_B.view(-1, G)
    mean, std = r_PG.mean(1, keepdim=True), r_PG.std(1, keepdim=True)  # torch.std: Bessel's correction
    return ((r_PG - mean) / (std + 1e-4)).reshape(-1)


def trl_formula_loss(lp_BL, old_BL, ref_BL, mask_BL, adv_B, loss_type: str, *, eps_low: float, eps_high: float,
                     beta: float, max_completion_length: int, accumulated_tokens: float | None = None):
    """TRL's documented per-token GRPO loss and aggregation (module docstring), on one micro-batch."""
    ratio = torch.exp(lp_BL - old_BL)
    a = adv_B[:, None]
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta != 0.0:
        d = ref_BL - lp_BL
        per_tok = per_tok + beta * (torch.exp(d) - d - 1)
    masked = per_tok * mask_BL
    if loss_type == "grpo":
        return (masked.sum(1) / mask_BL.sum(1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask_BL.sum().clamp(min=1)
    if loss_type == "dapo":
        return masked.sum() / (accumulated_tokens if accumulated_tokens is not None else mask_BL.sum())
    if loss_type == "dr_grpo":
        return masked.sum() / (mask_BL.shape[0] * max_completion_length)
    raise ValueError(loss_type)


def _flat(x_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    return x_BL[mask_BL.bool()]


def nova_loss(batch: dict, lp_BL: torch.Tensor, g: GRPOConfig, n_micro: int) -> torch.Tensor:
    """The GRPO stage's loss on the same tensors: whole groups per micro-batch, summed (what the trainer does)."""
    G, len_B = g.sampling.group_size, batch["len_B"]
    lens = len_B.tolist()
    totals = agg_totals(lens)
    if g.loss.agg == "seq-mean-token-sum-norm" and g.loss.sum_norm_len > 0:
        totals = replace(totals, longest=float(g.loss.sum_norm_len))
    n_groups = len(lens) // G
    bounds = torch.linspace(0, n_groups, n_micro + 1).round().long().tolist()
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = slice(a * G, b * G)
        mask = batch["mask_BL"][rows]
        part_lens = lens[a * G:b * G]
        scale, tok_w = agg_scale_and_weights(g.loss.agg, part_lens, totals)
        cu = torch.zeros(len(part_lens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(part_lens).cumsum(0)
        lp = _flat(lp_BL[rows], mask).float()
        n = lp.shape[0]  # the token fields: one document of the response tokens (the loss reads only the outputs)
        mb = RolloutBatch(input_ids=torch.zeros((1, n), dtype=torch.int64), targets=torch.zeros(n, dtype=torch.int64),
                          position_ids=torch.arange(n).unsqueeze(0), cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                          max_seqlen=n, old_logprobs=_flat(batch["old_BL"][rows], mask).float(),
                          ref_logprobs=_flat(batch["ref_BL"][rows], mask).float(),
                          rewards=batch["rewards_B"][rows].float(), response_cu_seqlens=cu, agg_scale=scale,
                          token_weights=tok_w)
        out = {"logprobs": lp, "entropy": torch.zeros_like(lp)}
        loss, _ = rl_loss_from_outputs(out, mb, g)
        total = total + loss
    return total


def _config(loss_type: str, G: int, beta: float, eps_high: float) -> GRPOConfig:
    return GRPOConfig(sampling=SamplingConfig(group_size=G), data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                      loss=GRPOLossConfig(agg=LOSS_TYPES[loss_type], adv_norm="std", beta=beta, kl="k3",
                                          kl_placement="loss", eps_low=0.2, eps_high=eps_high,
                                          sum_norm_len=MAX_COMPLETION if loss_type == "dr_grpo" else 0))


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.28), (0.04, 0.2)])
def test_stage_loss_equals_trl_formula(loss_type, beta, eps_high):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    G = int(torch.randint(2, 6, (1,), generator=gen))
    batch = _batch(gen, n_prompts=4, G=G)
    g = _config(loss_type, G, beta, eps_high)
    n_micro = 1 if loss_type == "bnpo" else 2  # TRL's bnpo normalises per micro-batch; the others globally
    msg = f"seed {seed} {loss_type} beta={beta} eps_high={eps_high} G={G}"

    lp_nova = batch["lp_BL"].float().requires_grad_()
    got = nova_loss(batch, lp_nova, g, n_micro)
    got.backward()

    lp_ref = batch["lp_BL"].clone().requires_grad_()
    adv_B = trl_advantages(batch["rewards_B"], G)
    expect = trl_formula_loss(lp_ref, batch["old_BL"], batch["ref_BL"], batch["mask_BL"], adv_B, loss_type,
                              eps_low=0.2, eps_high=eps_high, beta=beta, max_completion_length=MAX_COMPLETION)
    expect.backward()
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1), rtol=1e-5, atol=1e-7, name=msg)
    mask = batch["mask_BL"].bool()
    assert_close_verbose(lp_nova.grad[mask], lp_ref.grad[mask], rtol=1e-4, atol=1e-8, name=f"d logprobs {msg}")
    assert not lp_nova.grad[~mask].any(), f"padding got a gradient: {msg}"


def test_formula_oracle_spot_values():
    """The oracle itself on a hand-computed case: one group of G = 2, rewards (1, 0), one token each."""
    lp = torch.tensor([[-1.0], [-2.0]], dtype=torch.float64)
    old = lp - torch.tensor([[0.5], [0.0]], dtype=torch.float64)  # ratios e^0.5 = 1.6487 and 1
    mask = torch.ones(2, 1, dtype=torch.float64)
    adv = trl_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2)
    a = 0.5 / (2 ** -0.5 + 1e-4)  # deviations +-0.5, std = sqrt(0.5)
    assert torch.allclose(adv, torch.tensor([a, -a], dtype=torch.float64))
    got = trl_formula_loss(lp, old, lp, mask, adv, "grpo", eps_low=0.2, eps_high=0.28, beta=0.0,
                           max_completion_length=4)
    # response 1: min(1.6487 a, 1.28 a) = 1.28 a (clipped); response 2: ratio 1 -> -(-a) = a; mean of (-1.28 a, a)
    assert abs(got.item() - (-1.28 * a + a) / 2) < 1e-12
    got = trl_formula_loss(lp, old, lp, mask, adv, "dr_grpo", eps_low=0.2, eps_high=0.28, beta=0.0,
                           max_completion_length=4)
    assert abs(got.item() - (-1.28 * a + a) / (2 * 4)) < 1e-12


# ----------------------------------------------------------------------------------------------- TRL itself
def _trl_trainer(trl_grpo, loss_type: str, beta: float, eps_high: float, n_micro: int, lp_BL: torch.Tensor):
    """A GRPOTrainer with just the state `_compute_loss` reads (no model, no data); its log-prob function returns
    the rows of the given leaf that the micro-batch asks for (matched by the completion ids, which hold row numbers)."""
    from collections import defaultdict
    from types import SimpleNamespace

    t = trl_grpo.GRPOTrainer.__new__(trl_grpo.GRPOTrainer)
    t.loss_type, t.beta, t.epsilon_low, t.epsilon_high = loss_type, beta, 0.2, eps_high
    t.max_completion_length, t.importance_sampling_level, t.top_entropy_quantile = MAX_COMPLETION, "token", 1.0
    t.off_policy_mask_threshold, t.use_vllm, t.aux_loss_enabled, t._entropy_bonus_enabled = None, False, False, False
    t.current_gradient_accumulation_steps = n_micro
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=n_micro)
    t.model = SimpleNamespace(training=True)
    t.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def logps(model, input_ids, attention_mask, logits_to_keep, **_):
        rows = input_ids[:, -logits_to_keep]  # completion_ids[:, 0] carries the row number (see below)
        return lp_BL[rows], torch.zeros_like(lp_BL[rows]), None

    t._get_per_token_logps_and_entropies = logps
    return t


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.28), (0.04, 0.2)])
def test_stage_loss_equals_trl_grpo_trainer(loss_type, beta, eps_high):
    """TRL 1.16's own GRPOTrainer._compute_loss on the same tensors (skipped where trl is not installed: CI's .venv)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer",
                                   reason="trl is not installed here (it lives in .venv-bench: make bench-deps)")
    from trl.trainer.utils import nanstd

    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    G = int(torch.randint(2, 6, (1,), generator=gen))
    batch = _batch(gen, n_prompts=4, G=G)
    n_micro = 1 if loss_type == "bnpo" else 2
    msg = f"seed {seed} {loss_type} beta={beta} eps_high={eps_high} G={G}"
    B, L = batch["lp_BL"].shape

    # TRL's advantage lines (group mean, nanstd with Bessel's correction, + 1e-4), then its loss per micro-batch
    r = batch["rewards_B"].float()
    mean = r.view(-1, G).mean(1).repeat_interleave(G)
    adv_B = (r - mean) / (nanstd(r.view(-1, G), dim=1).repeat_interleave(G) + 1e-4)
    lp_trl = batch["lp_BL"].float().requires_grad_()
    trainer = _trl_trainer(trl_grpo, loss_type, beta, eps_high, n_micro, lp_trl)
    rows_B = torch.arange(B)
    mask = batch["mask_BL"]
    expect = 0.0
    n_groups = B // G
    bounds = torch.linspace(0, n_groups, n_micro + 1).round().long().tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = slice(a * G, b * G)
        n = (b - a) * G
        inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
                  "completion_ids": rows_B[rows, None].expand(n, L).contiguous(),
                  "completion_mask": mask[rows].long(), "advantages": adv_B[rows],
                  "old_per_token_logps": batch["old_BL"][rows].float(),
                  "ref_per_token_logps": batch["ref_BL"][rows].float(), "num_items_in_batch": mask.sum()}
        expect = expect + trainer._compute_loss(None, inputs)
    expect.backward()

    lp_nova = batch["lp_BL"].float().requires_grad_()
    got = nova_loss(batch, lp_nova, _config(loss_type, G, beta, eps_high), n_micro)
    got.backward()
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1), rtol=1e-5, atol=1e-7, name=msg)
    m = mask.bool()
    assert_close_verbose(lp_nova.grad[m], lp_trl.grad[m], rtol=1e-4, atol=1e-8, name=f"d logprobs {msg}")
