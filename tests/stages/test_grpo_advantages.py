"""grpo.loss.advantage's estimators (nova_rt.stages.grpo.advantages) against independent references.

  * fp64 references written from the definitions, one response at a time: RLOO's explicit leave-one-out mean, and
    REINFORCE++(-baseline) as whitening over the step's tokens (each response's value repeated over its tokens, numpy
    mean and ddof=1 variance of that token array);
  * the peers' formulas on their own tensor layout: TRL's RLOOTrainer baseline (group sum minus the reward, over
    G - 1) and verl's masked_whiten over a padded (B, L) response mask (reinforce_plus_plus with gamma 1 and an
    outcome reward on the last token; reinforce_plus_plus_baseline's group-mean-subtracted scores);
  * global over data-parallel ranks: two gloo processes, each with half the groups, equal the one-process result on
    all of them;
  * edge cases: equal rewards give exactly 0, empty and length-1 responses, G not a power of two, one group.
"""

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nova_rt.stages.grpo.advantages import estimate_advantages, group_advantages, zero_advantage_counts

ESTIMATORS = ("group", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def _local(values: torch.Tensor) -> torch.Tensor:
    return values


def _random_step(rng: random.Random, groups: int, group_size: int, ties: bool):
    rewards, lengths = [], []
    for _ in range(groups):
        if ties and rng.random() < 0.3:
            rewards.append([rng.choice([0.0, 1.0])] * group_size)
        else:
            rewards.append([rng.choice([0.0, 0.5, 1.0]) if ties else rng.gauss(0, 2) for _ in range(group_size)])
        lengths.append([rng.choice([0, 1, rng.randint(1, 40)]) for _ in range(group_size)])
    return rewards, lengths


def _rloo_ref(rewards):
    out = []
    for group in rewards:
        out.append([reward - np.mean([other for j, other in enumerate(group) if j != i])
                    for i, reward in enumerate(group)])
    return out


def _whiten_ref(values, lengths):
    tokens = np.array([value for group, group_lengths in zip(values, lengths)
                       for value, length in zip(group, group_lengths) for _ in range(length)], dtype=np.float64)
    mean, variance = tokens.mean(), tokens.var(ddof=1)
    return [[(value - mean) / np.sqrt(variance + 1e-8) for value in group] for group in values]


def _reference(estimator, rewards, lengths, adv_norm):
    if estimator == "group":
        out = []
        for group in rewards:
            arr = np.asarray(group, dtype=np.float64)
            deviation = arr - arr.mean()
            out.append(list(deviation / (arr.std(ddof=1) + 1e-4)) if adv_norm == "std" else list(deviation))
        return out
    if estimator == "rloo":
        return _rloo_ref(rewards)
    if estimator == "reinforce_pp":
        return _whiten_ref(rewards, lengths)
    return _whiten_ref([[reward - np.mean(group) for reward in group] for group in rewards], lengths)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("group_size", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(4))
def test_estimators_equal_fp64_reference(estimator, group_size, seed):
    rng = random.Random(seed * 31 + group_size)
    rewards, lengths = _random_step(rng, rng.randint(1, 7), group_size, ties=seed % 2 == 0)
    if sum(map(sum, lengths)) < 2:
        lengths[0][0] = 5
    for adv_norm in ("std", "none"):
        got = estimate_advantages(rewards, lengths, estimator, adv_norm, _local)
        want = _reference(estimator, rewards, lengths, adv_norm)
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-9, atol=1e-9)


def test_group_matches_grpo_loss_torch_advantages():
    """`group` here is what grpo_loss computes inside (used for the zero-advantage count)."""
    from nova_rt.kernels.grpo_loss_torch import _group_advantage_torch

    rng = random.Random(5)
    for group_size in (2, 3, 7):
        rewards, _ = _random_step(rng, 6, group_size, ties=True)
        for adv_norm in ("std", "none"):
            ours = np.concatenate([group_advantages(group, adv_norm) for group in rewards])
            kernel = _group_advantage_torch(torch.tensor(np.concatenate(rewards), dtype=torch.float64), group_size,
                                            adv_norm).double().numpy()
            np.testing.assert_allclose(ours, kernel, rtol=1e-6, atol=1e-6)


def test_rloo_equals_trl_baseline():
    """TRL's RLOOTrainer: baseline = (group sum - R_i) / (G - 1), advantage = R_i - baseline (no normalisation)."""
    generator = torch.Generator().manual_seed(0)
    for group_size in (2, 4, 6):
        rewards = torch.randn(5, group_size, generator=generator, dtype=torch.float64)
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
        trl = (rewards - baseline).reshape(-1)
        ours = estimate_advantages(rewards.tolist(), [[3] * group_size] * 5, "rloo", "std", _local)
        np.testing.assert_allclose(np.concatenate(ours), trl.numpy(), rtol=1e-12, atol=1e-12)


def _verl_masked_whiten(values_BL, mask_BL):
    """verl.utils.torch_functional.masked_whiten with shift_mean=True (masked mean, unbiased masked variance)."""
    mean = (values_BL * mask_BL).sum() / mask_BL.sum()
    variance = (((values_BL - mean) ** 2) * mask_BL).sum() / mask_BL.sum()
    variance = variance * mask_BL.sum() / (mask_BL.sum() - 1)
    return (values_BL - mean) * torch.rsqrt(variance + 1e-8)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_equals_verl_formula(estimator):
    """verl's compute_reinforce_plus_plus_outcome_advantage (gamma 1, outcome reward on the last response token:
    every token's return is R) and ..._baseline_outcome_advantage (R minus its group's mean on every token), both
    whitened over the padded response mask; a response's tokens all get the same advantage."""
    rng = random.Random(11)
    group_size = 4
    rewards, lengths = _random_step(rng, 5, group_size, ties=False)
    lengths[0][0] = 0  # an empty response: no tokens in the mask
    flat_rewards = torch.tensor(np.concatenate(rewards), dtype=torch.float64)
    flat_lengths = [length for group in lengths for length in group]
    longest = max(flat_lengths)
    mask_BL = torch.tensor([[1.0] * n + [0.0] * (longest - n) for n in flat_lengths], dtype=torch.float64)
    if estimator == "reinforce_pp":
        returns_BL = flat_rewards[:, None] * mask_BL  # gamma = 1: the return at every token is the outcome
    else:
        group_mean = flat_rewards.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
        returns_BL = (flat_rewards - group_mean)[:, None] * mask_BL
    verl_BL = _verl_masked_whiten(returns_BL, mask_BL) * mask_BL
    ours = np.concatenate(estimate_advantages(rewards, lengths, estimator, "std", _local))
    for i, length in enumerate(flat_lengths):
        if length:
            np.testing.assert_allclose(verl_BL[i, :length].numpy(), np.full(length, ours[i]), rtol=1e-10,
                                       atol=1e-10)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_equal_rewards_give_exact_zero(estimator):
    rewards = [[0.1] * 3, [0.7] * 3] if estimator != "reinforce_pp" else [[0.3] * 3, [0.3] * 3]
    advantages = estimate_advantages(rewards, [[4, 0, 1], [2, 9, 3]], estimator, "std", _local)
    assert all(value == 0.0 for group in advantages for value in group)
    assert zero_advantage_counts(advantages, _local) == (6.0, 6.0)


def test_unknown_estimator_names_choices():
    with pytest.raises(ValueError, match="group, rloo, reinforce_pp, reinforce_pp_baseline"):
        estimate_advantages([[1.0, 0.0]], [[1, 1]], "ppo", "std", _local)


def _dp_worker(rank: int, port: int, rewards, lengths, split: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = slice(0, split) if rank == 0 else slice(split, len(rewards))

        def dp_sum(values):
            dist.all_reduce(values)
            return values

        results = {}
        for estimator in ESTIMATORS:
            advantages = estimate_advantages(rewards[mine], lengths[mine], estimator, "std", dp_sum)
            results[estimator] = (advantages, zero_advantage_counts(advantages, dp_sum))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", [0, 2])
def test_global_over_two_gloo_ranks(tmp_path, split):
    """Two data-parallel ranks (one may hold no group) give the one-process advantages of all the groups."""
    rng = random.Random(3)
    rewards, lengths = _random_step(rng, 5, 3, ties=True)
    port = 29500 + random.Random().randint(0, 2000)
    mp.start_processes(_dp_worker, args=(port, rewards, lengths, split, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    parts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for estimator in ESTIMATORS:
        whole = estimate_advantages(rewards, lengths, estimator, "std", _local)
        got = parts[0][estimator][0] + parts[1][estimator][0]
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(whole), rtol=1e-12, atol=1e-12)
        assert parts[0][estimator][1] == parts[1][estimator][1] == list(zero_advantage_counts(whole, _local))
