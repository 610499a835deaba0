"""Advantage estimators (grpo.loss.advantage) over a rollout step's groups, global over the data-parallel ranks.

    group                  (R_i - mean_g R) / (std_g R + 1e-4), or R_i - mean_g R (adv_norm none): inside grpo_loss
    rloo                   R_i - mean_{j != i in g} R_j = G / (G - 1) (R_i - mean_g R)      (RLOO, arXiv 2402.14740)
    reinforce_pp           whiten(R)                                           (REINFORCE++, arXiv 2501.03262)
    reinforce_pp_baseline  whiten(R_i - mean_g R)                              (REINFORCE++-baseline)

whiten(x)_i = (x_i - mu) / sqrt(var + 1e-8), mu and var over every response token of the step on every
data-parallel rank (each response weighs its length; var with Bessel's correction over tokens), as verl's
masked_whiten over its response mask and OpenRLHF's global normalisation. Deviations against a group's first reward
make equal rewards give exactly 0. With the KL in the reward (grpo.loss.kl_placement: reward) its return-to-go is
added after whitening (verl whitens returns that include it). adv_norm applies to `group` only.
"""

from __future__ import annotations

from typing import Literal

import torch

AdvantageEstimator = Literal["group", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("group", "rloo", "reinforce_pp", "reinforce_pp_baseline")
_STD_EPS = 1e-4
_WHITEN_EPS = 1e-8


def _deviations(rewards: list[float]) -> list[float]:
    """R_j - mean R, taken against the first reward so that equal rewards give exactly zero."""
    offsets = [reward - rewards[0] for reward in rewards]
    mean_offset = sum(offsets) / len(offsets)
    return [offset - mean_offset for offset in offsets]


def group_advantages(rewards: list[float], adv_norm: str) -> list[float]:
    """The `group` estimator for one group (what grpo_loss computes from the rewards), in float64."""
    deviations = _deviations(rewards)
    if adv_norm != "std":
        return deviations
    std = (sum(d * d for d in deviations) / max(len(rewards) - 1, 1)) ** 0.5
    return [d / (std + _STD_EPS) for d in deviations]


def rloo_advantages(rewards: list[float]) -> list[float]:
    """Leave-one-out: R_i minus the mean of the group's other rewards."""
    count = len(rewards)
    if count < 2:
        return [0.0] * count
    offsets = [reward - rewards[0] for reward in rewards]
    total = sum(offsets)
    return [offset - (total - offset) / (count - 1) for offset in offsets]


def _whiten(values: list[list[float]], lengths: list[list[int]], dp_sum) -> list[list[float]]:
    """(x - mu) / sqrt(var + 1e-8) with token-weighted global mean and Bessel-corrected variance."""
    pairs = [(value, length) for group, group_lengths in zip(values, lengths) for value, length in
             zip(group, group_lengths)]
    sums = dp_sum(torch.tensor([float(sum(length for _, length in pairs)),
                                sum(value * length for value, length in pairs)], dtype=torch.float64)).tolist()
    tokens = sums[0]
    mean = sums[1] / tokens if tokens > 0 else 0.0
    square = dp_sum(torch.tensor([sum(length * (value - mean) ** 2 for value, length in pairs)],
                                 dtype=torch.float64)).item()
    variance = square / (tokens - 1) if tokens > 1 else 0.0
    scale = (variance + _WHITEN_EPS) ** -0.5
    return [[(value - mean) * scale for value in group] for group in values]


def estimate_advantages(rewards: list[list[float]], lengths: list[list[int]], estimator: str, adv_norm: str,
                        dp_sum) -> list[list[float]]:
    """Per-response advantages of this rank's groups (`rewards[g][i]`, response lengths `lengths[g][i]`), in
    float64. `dp_sum`: in-place float64 sum over the data-parallel ranks (identity on one rank); every rank must
    call this (the whitening estimators all-reduce even with no groups here)."""
    if estimator == "group":
        return [group_advantages(group, adv_norm) for group in rewards]
    if estimator == "rloo":
        return [rloo_advantages(group) for group in rewards]
    if estimator == "reinforce_pp":
        return _whiten([list(group) for group in rewards], lengths, dp_sum)
    if estimator == "reinforce_pp_baseline":
        return _whiten([_deviations(group) for group in rewards], lengths, dp_sum)
    raise ValueError(f"grpo.loss.advantage must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {estimator!r}")


def zero_advantage_counts(advantages: list[list[float]], dp_sum) -> tuple[float, float]:
    """(responses whose advantage is exactly 0, responses), summed over the data-parallel ranks."""
    flat = [value for group in advantages for value in group]
    counts = dp_sum(torch.tensor([float(sum(value == 0.0 for value in flat)), float(len(flat))],
                                 dtype=torch.float64)).tolist()
    return counts[0], counts[1]
