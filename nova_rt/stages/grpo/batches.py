"""GRPO's data, typed: a rollout step's groups and statistics, its micro-batches (RolloutBatch for sampled
responses, PTXBatch for the PTX penalty's SFT rows; both nova_rt.data.micro_batch.PackedBatch), prompt+response
packing (optionally with each prompt shared by its G responses), and the weights that make per-micro-batch losses
sum to the global aggregation. The policy's log-prob head on target rows only (PolicyLogprobs) lives in
nova_rt.models.causal and is re-exported here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import torch

from nova_rt.backends.hf import policy_forward
from nova_rt.data.chat import IGNORE, Sample
from nova_rt.data.micro_batch import PackedBatch
from nova_rt.data.packing import collate, make_row
from nova_rt.models.attention import SharedPrefixLayout
from nova_rt.models.causal import PolicyLogprobs

_forward = policy_forward  # the name losses and tests use
__all__ = ["AggregationTotals", "PTXBatch", "PackedResponses", "PolicyLogprobs", "RolloutBatch", "RolloutGroup",
           "RolloutStats", "_forward", "agg_scale_and_weights", "agg_totals", "pack_responses"]

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@dataclass(frozen=True)
class RolloutGroup:
    """One prompt and its G sampled responses, scored (this rank's share of a rollout step)."""

    prompt: list[int]
    responses: list[list[int]]
    rewards: list[float]
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    """The engine's sampling log-prob of every response token (for grpo.rollout.correction)."""
    advantages: list[float] | None = None
    """Per-response advantages from grpo.loss.advantage (None: `group`, which grpo_loss computes from rewards)."""
    response_masks: list[list[bool]] | None = None
    """Multi-turn episodes (grpo.env): per response token, whether the model sampled it (True: a target carrying
    loss) or it is context (environment / tool messages and their template tokens). None: every token sampled."""

    def target_lengths(self) -> list[int]:
        """Tokens per response that carry loss (the sampled ones)."""
        if self.response_masks is None:
            return [len(response) for response in self.responses]
        return [sum(mask) for mask in self.response_masks]


@dataclass(frozen=True)
class RolloutStats:
    """Sums over the samples of a rollout step (this rank's, or every rank's once summed with `dp_summed`)."""

    samples: float = 0.0
    reward_sum: float = 0.0
    reward_square_sum: float = 0.0
    correct_sum: float = 0.0
    """Correct samples (verifiable rewards only)."""
    response_tokens: float = 0.0
    truncated: float = 0.0
    """Samples that hit max_new_tokens."""
    equal_reward_groups: float = 0.0
    """Groups whose rewards are all equal (no learning signal)."""

    def __add__(self, other: RolloutStats) -> RolloutStats:
        return RolloutStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def dp_summed(self, dp_sum) -> RolloutStats:
        """The sums over the data-parallel ranks (`dp_sum`: the backend's in-place float64 all-reduce)."""
        values = torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)
        return RolloutStats(*dp_sum(values).tolist())

    def metrics(self, group_size: int, groups_trained: float, verifiable: bool) -> dict:
        """The rollout metrics of metrics.jsonl (accuracy only for verifiable rewards)."""
        samples, mean = self.samples, self.reward_sum / self.samples
        metrics = {"reward_mean": mean, "reward_std": max(self.reward_square_sum / samples - mean * mean, 0.0) ** 0.5,
                   "response_len": self.response_tokens / samples, "truncated_frac": self.truncated / samples,
                   "equal_reward_group_frac": self.equal_reward_groups / (samples / group_size),
                   "groups_trained": groups_trained}
        if verifiable:
            metrics["accuracy"] = self.correct_sum / samples
        return metrics


@dataclass(frozen=True, kw_only=True)
class PackedResponses(PackedBatch):
    """Prompt+response sequences packed with targets on the response tokens only (pack_responses)."""

    response_cu_seqlens: torch.Tensor
    """(B+1,) int64 boundaries of each response in the flat order of the response (target) tokens."""


@dataclass(frozen=True, kw_only=True)
class RolloutBatch(PackedResponses):
    """A micro-batch of whole groups for the RL loss; the optional fields are set by GRPORun.precompute."""

    rewards: torch.Tensor
    """(B,) fp32 sequence rewards, G per group in group order."""
    advantages: torch.Tensor | None = None
    """(B,) fp32 advantages of grpo.loss.advantage other than `group` (global estimators need every rank)."""
    agg_scale: float
    """Factor turning grpo_loss's within-call aggregation into the global one (agg_scale_and_weights)."""
    token_weights: torch.Tensor
    """(N,) the global aggregation's weight of each response token (for the top-k KL placed in the loss)."""
    rollout_logprobs: torch.Tensor | None = None
    """(N,) the engine's sampling log-probs (grpo.rollout.correction other than none)."""
    ref_logprobs: torch.Tensor | None = None
    """(N,) the reference's log-probs of the response tokens (sampled-token KL estimators)."""
    ref_topk_logprobs: torch.Tensor | None = None
    """(N, K) the reference's log-probs at its top-k ids `ref_topk_ids` (the top-k KL)."""
    old_logprobs: torch.Tensor | None = None
    """(N,) the rollout policy's log-probs, when the batch serves several optimizer steps."""
    old_kl: torch.Tensor | None = None
    """(N,) KL_t of the rollout policy to the reference (the KL in the reward, batch serving several steps)."""


@dataclass(frozen=True, kw_only=True)
class PTXBatch(PackedBatch):
    """A micro-batch of SFT rows for the PTX penalty (temperature 1, no entropy)."""

    token_weights: torch.Tensor
    """(N,) 1 / (supervised tokens of the step's PTX rows, all ranks) per supervised token."""
    ref_topk_logprobs: torch.Tensor
    """(N, K) the reference's log-probs at its top-k ids `ref_topk_ids`."""


def pack_responses(prompts: list[list[int]], responses: list[list[int]], shared_prefix: bool = False,
                   response_masks: list[list[bool]] | None = None) -> PackedResponses:
    """One flat micro-batch of prompt+response sequences; targets only on response tokens (and, with
    `response_masks`, only on the tokens whose mask is True: the rest are context, as env messages of an episode).

    shared_prefix: adjacent responses to the same prompt form a group laid out as [prompt[:-1]] then, per non-empty
    response r, [prompt[-1]] + r[:-1] at positions len(prompt)-1 ...; each response segment attends to the prompt
    part and causally to itself (SharedPrefixLayout), so every target token sees exactly the context it has in its
    own prompt+response sequence. The last prompt token is repeated per response because its hidden state predicts
    each response's first token. cu_seqlens then marks the groups."""
    if response_masks is None:
        target_ids = responses
    else:
        if [len(mask) for mask in response_masks] != [len(response) for response in responses]:
            raise ValueError("pack_responses: a response mask's length differs from its response's")
        target_ids = [[token if keep else IGNORE for token, keep in zip(response, mask)]
                      for response, mask in zip(responses, response_masks)]
    target_counts = [sum(token != IGNORE for token in targets) for targets in target_ids]
    response_cu = torch.tensor(np.concatenate([[0], np.cumsum(target_counts)]), dtype=torch.int64)
    if not shared_prefix:
        samples = []
        for prompt, response, response_targets in zip(prompts, responses, target_ids):
            ids = np.asarray((prompt + response)[:-1] if response else prompt, dtype=np.int64)  # last: no input
            targets = np.asarray([IGNORE] * (len(prompt) - 1) + response_targets if response
                                 else [IGNORE] * len(prompt), dtype=np.int64)
            samples.append(Sample(ids, targets))
        return PackedResponses.from_collated(collate([make_row(samples)]), response_cu_seqlens=response_cu)
    ids, targets, positions, groups = [], [], [], []
    start = 0
    while start < len(prompts):
        prompt, end = prompts[start], start
        while end < len(prompts) and prompts[end] == prompt:
            end += 1
        if not prompt:
            raise ValueError("pack_responses: empty prompt")
        prefix = len(prompt) - 1
        ids.append(prompt[:-1]), targets.append([IGNORE] * prefix), positions.append(list(range(prefix)))
        segments = []
        for response, response_targets in zip(responses[start:end], target_ids[start:end]):
            if response:
                ids.append([prompt[-1]] + response[:-1]), targets.append(response_targets)
                positions.append(list(range(prefix, prefix + len(response))))
                segments.append(len(response))
        groups.append((prefix, segments))
        start = end
    flat = lambda parts: torch.tensor([x for part in parts for x in part], dtype=torch.int64)  # noqa: E731
    cu = torch.tensor(np.concatenate([[0], np.cumsum([prefix + sum(segments) for prefix, segments in groups])]),
                      dtype=torch.int32)
    return PackedResponses(input_ids=flat(ids).unsqueeze(0), targets=flat(targets),
                           position_ids=flat(positions).unsqueeze(0), cu_seqlens=cu,
                           max_seqlen=int((cu[1:] - cu[:-1]).max()), response_cu_seqlens=response_cu,
                           shared_prefix=SharedPrefixLayout.build(groups))


@dataclass(frozen=True)
class AggregationTotals:
    """A rollout batch's response totals over the data-parallel ranks, for the global aggregation weights."""

    tokens: float
    nonempty_responses: float
    responses: float
    longest: float
    """The longest response (or grpo.loss.sum_norm_len, a constant L, when set)."""


def agg_totals(lengths: list[int], group=None) -> AggregationTotals:
    """The totals of this rank's response lengths, summed / maxed over the ranks of `group` (default: all; the
    megatron backend passes its data-parallel group)."""
    sums = torch.tensor([float(sum(lengths)), float(sum(x > 0 for x in lengths)), float(len(lengths))],
                        dtype=torch.float64)
    longest = torch.tensor([float(max(lengths, default=0))], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX, group=group)
    return AggregationTotals(*torch.cat([sums, longest]).tolist())


def agg_scale_and_weights(agg: Aggregation, lengths: list[int],
                          totals: AggregationTotals) -> tuple[float, torch.Tensor]:
    """(factor turning grpo_loss's within-call aggregation into the global one, global per-token weights)."""
    tokens, nonempty, responses, longest = (max(float(x), 1.0) for x in (totals.tokens, totals.nonempty_responses,
                                                                          totals.responses, totals.longest))
    length_t = torch.tensor(lengths, dtype=torch.float32)
    if agg == "token-mean":
        scale, weight_per_response = sum(lengths) / tokens, torch.full((len(lengths),), 1.0 / tokens)
    elif agg == "seq-mean-token-mean":
        scale = float(sum(x > 0 for x in lengths)) / nonempty
        weight_per_response = torch.where(length_t > 0, 1.0 / (nonempty * length_t.clamp(min=1)), 0.0)
    else:
        scale = len(lengths) * max(max(lengths, default=0), 1) / (responses * longest)
        weight_per_response = torch.full((len(lengths),), 1.0 / (responses * longest))
    return scale, weight_per_response.repeat_interleave(torch.tensor(lengths, dtype=torch.int64))
