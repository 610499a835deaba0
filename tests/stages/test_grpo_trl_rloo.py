"""grpo.loss.advantage=rloo against TRL's RLOOTrainer (trl 1.16) on identical tensors.

TRL's RLOO advantage is R_i - (sum_g R - R_i) / (G - 1) (no normalisation by default), and its loss is sequence-level:
ratio_i = exp(sum_t lp - sum_t old), per_sequence = -min(ratio_i A_i, clip(ratio_i) A_i), loss = mean_i. One update
per rollout batch (old = the current policy, detached: every ratio is 1, no clipping), its gradient per token is
-A_i / B: exactly nova_rt's token-level surrogate with advantage=rloo and agg=seq-mean-token-sum-norm, sum_norm_len
= 1 (per-token weight 1 / (B * 1)). So the gradients are compared in that regime (the loss values differ by design:
TRL's is -mean_i A_i, nova_rt's sums over tokens). Off-policy (ppo_epochs > 1) the two differ: TRL clips one ratio of
summed log-probs per sequence, nova_rt one ratio per token (or per sequence with grpo.loss.mode: gspo, a mean).

Two oracles: TRL's advantage lines and gradient written out (runs in CI, whose .venv has no TRL), and
RLOOTrainer._compute_loss itself where trl imports (.venv-bench)."""

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
from nova_rt.stages.grpo.advantages import estimate_advantages
from tests.helpers import assert_close_verbose
from tests.stages.test_grpo_trl_equivalence import _batch, _flat, _seed


def trl_rloo_advantages(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    grouped = rewards_B.view(-1, group_size)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baselines).reshape(-1)


def nova_rloo_grad(batch: dict, n_micro: int) -> torch.Tensor:
    """d loss / d logprobs of the GRPO stage's loss with advantage=rloo, on-policy, over n_micro micro-batches."""
    group_size, lengths = batch["G"], batch["len_B"].tolist()
    g = GRPOConfig(sampling=SamplingConfig(group_size=group_size), data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                   loss=GRPOLossConfig(agg="seq-mean-token-sum-norm", sum_norm_len=1, advantage="rloo", beta=0.0))
    rewards = batch["rewards_B"].view(-1, group_size).tolist()
    advantages = torch.tensor(sum(estimate_advantages(rewards, [[1] * group_size] * len(rewards), "rloo", "std",
                                                      lambda values: values), []), dtype=torch.float32)
    totals = agg_totals(lengths)
    from dataclasses import replace

    totals = replace(totals, longest=1.0)
    lp_BL = batch["lp_BL"].float().requires_grad_()
    n_groups = len(lengths) // group_size
    bounds = torch.linspace(0, n_groups, n_micro + 1).round().long().tolist()
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = slice(a * group_size, b * group_size)
        mask, part = batch["mask_BL"][rows], lengths[a * group_size:b * group_size]
        scale, token_weights = agg_scale_and_weights(g.loss.agg, part, totals)
        cu = torch.zeros(len(part) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(part).cumsum(0)
        lp = _flat(lp_BL[rows], mask)
        n = lp.shape[0]
        mb = RolloutBatch(input_ids=torch.zeros((1, n), dtype=torch.int64), targets=torch.zeros(n, dtype=torch.int64),
                          position_ids=torch.arange(n).unsqueeze(0), cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                          max_seqlen=n, old_logprobs=lp.detach(), rewards=batch["rewards_B"][rows].float(),
                          advantages=advantages[rows], response_cu_seqlens=cu, agg_scale=scale,
                          token_weights=token_weights)
        loss, _ = rl_loss_from_outputs({"logprobs": lp, "entropy": torch.zeros_like(lp)}, mb, g)
        total = total + loss
    total.backward()
    return lp_BL.grad


@pytest.mark.parametrize("n_micro", [1, 2])
def test_rloo_gradient_equals_trl_formula(n_micro):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    group_size = int(torch.randint(2, 6, (1,), generator=gen))
    batch = _batch(gen, n_prompts=4, G=group_size)
    advantages = trl_rloo_advantages(batch["rewards_B"], group_size)
    ours = estimate_advantages(batch["rewards_B"].view(-1, group_size).tolist(),
                               [[1] * group_size] * 4, "rloo", "std", lambda values: values)
    assert_close_verbose(torch.tensor(sum(ours, []), dtype=torch.float64), advantages, rtol=1e-12, atol=1e-12,
                         name=f"seed {seed}")
    batch_size = advantages.numel()
    want = (-advantages[:, None] / batch_size * batch["mask_BL"]).float()  # d(-mean_i ratio_i A_i)/d lp at ratio 1
    got = nova_rloo_grad(batch, n_micro)
    assert_close_verbose(got, want, rtol=1e-5, atol=1e-8, name=f"seed {seed} G={group_size}")


@pytest.mark.parametrize("n_micro", [1, 2])
def test_rloo_gradient_equals_trl_rloo_trainer(n_micro):
    """RLOOTrainer._compute_loss of trl 1.16 (skipped where trl is not installed: CI's .venv)."""
    trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer",
                                   reason="trl is not installed here (it lives in .venv-bench: make bench-deps)")
    from collections import defaultdict
    from types import SimpleNamespace

    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    group_size = int(torch.randint(2, 6, (1,), generator=gen))
    batch = _batch(gen, n_prompts=4, G=group_size)
    batch_size, length = batch["lp_BL"].shape
    lp_trl = batch["lp_BL"].float().requires_grad_()
    trainer = trl_rloo.RLOOTrainer.__new__(trl_rloo.RLOOTrainer)
    trainer.epsilon_low, trainer.epsilon_high, trainer.aux_loss_enabled = 0.2, 0.2, False
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x,
                                          gather_for_metrics=lambda x: x)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def logps(model, input_ids, attention_mask, logits_to_keep, **_):
        rows = input_ids[:, -logits_to_keep]  # completion_ids[:, 0] carries the row number
        return lp_trl[rows], torch.zeros_like(lp_trl[rows]), None

    trainer._get_per_token_logps_and_entropies = logps
    # TRL's advantage lines on the whole batch (rewards gathered), then its loss per micro-batch; the HF Trainer
    # divides each micro-batch's loss by the gradient-accumulation steps
    advantages = trl_rloo_advantages(batch["rewards_B"].float(), group_size)
    mask = batch["mask_BL"]
    bounds = torch.linspace(0, batch_size // group_size, n_micro + 1).round().long().tolist()
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = slice(a * group_size, b * group_size)
        n = (b - a) * group_size
        old = (batch["lp_BL"][rows].float() * mask[rows]).sum(1)
        inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
                  "completion_ids": torch.arange(batch_size)[rows, None].expand(n, length).contiguous(),
                  "completion_mask": mask[rows].long(), "advantages": advantages[rows], "old_logps": old}
        total = total + trainer._compute_loss(None, inputs) * n / batch_size
    total.backward()
    got = nova_rloo_grad(batch, n_micro)
    assert_close_verbose(got, lp_trl.grad * mask, rtol=1e-5, atol=1e-8, name=f"seed {seed} G={group_size}")
