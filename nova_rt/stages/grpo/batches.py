"""GRPO micro-batches: prompt+response packing (optionally with each prompt shared by its G responses) and the
weights that make per-micro-batch losses sum to the global aggregation. The policy's log-prob head on target rows
only (PolicyLogprobs) lives in nova_rt.models.causal and is re-exported here."""

from __future__ import annotations

import numpy as np
import torch

from nova_rt.data.chat import IGNORE, Sample
from nova_rt.data.packing import collate, make_row
from nova_rt.models.attention import SharedPrefixLayout
from nova_rt.models.causal import PolicyLogprobs, policy_forward

_forward = policy_forward  # the name losses and tests use
__all__ = ["PolicyLogprobs", "_forward", "agg_scale_and_weights", "agg_totals", "pack_responses"]


def pack_responses(prompts: list[list[int]], responses: list[list[int]], shared_prefix: bool = False) -> dict:
    """One flat micro-batch of prompt+response sequences; targets only on response tokens. Adds resp_cu (B+1,).

    shared_prefix: adjacent responses to the same prompt form a group laid out as [prompt[:-1]] then, per non-empty
    response r, [prompt[-1]] + r[:-1] at positions len(prompt)-1 ...; each response segment attends to the prompt
    part and causally to itself (SharedPrefixLayout), so every target token sees exactly the context it has in its
    own prompt+response sequence. The last prompt token is repeated per response because its hidden state predicts
    each response's first token. cu_seqlens then marks the groups."""
    resp_cu = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in responses])]), dtype=torch.int64)
    if not shared_prefix:
        samples = []
        for p, r in zip(prompts, responses):
            ids = np.asarray((p + r)[:-1] if r else p, dtype=np.int64)  # the last token is never an input
            tg = np.asarray([IGNORE] * (len(p) - 1) + r if r else [IGNORE] * len(p), dtype=np.int64)
            samples.append(Sample(ids, tg))
        mb = collate([make_row(samples)])
        mb["resp_cu"] = resp_cu
        return mb
    ids, tgs, pos, groups = [], [], [], []
    i = 0
    while i < len(prompts):
        p, j = prompts[i], i
        while j < len(prompts) and prompts[j] == p:
            j += 1
        if not p:
            raise ValueError("pack_responses: empty prompt")
        a = len(p) - 1
        ids.append(p[:-1]), tgs.append([IGNORE] * a), pos.append(list(range(a)))
        segs = []
        for r in responses[i:j]:
            if r:
                ids.append([p[-1]] + r[:-1]), tgs.append(r), pos.append(list(range(a, a + len(r))))
                segs.append(len(r))
        groups.append((a, segs))
        i = j
    flat = lambda xs: torch.tensor([x for part in xs for x in part], dtype=torch.int64)  # noqa: E731
    cu = torch.tensor(np.concatenate([[0], np.cumsum([a + sum(segs) for a, segs in groups])]), dtype=torch.int32)
    return {"input_ids": flat(ids).unsqueeze(0), "targets": flat(tgs), "position_ids": flat(pos).unsqueeze(0),
            "cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max()), "resp_cu": resp_cu,
            "shared_prefix": SharedPrefixLayout.build(groups)}


def agg_totals(lens: list[int], group=None) -> torch.Tensor:
    """[tokens, non-empty responses, responses, longest] of this rank's part; summed / maxed over the ranks of
    `group` (default: all; the megatron backend passes its data-parallel group)."""
    t = torch.tensor([float(sum(lens)), float(sum(x > 0 for x in lens)), float(len(lens))], dtype=torch.float64)
    longest = torch.tensor([float(max(lens, default=0))], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, group=group)
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX, group=group)
    return torch.cat([t, longest])


def agg_scale_and_weights(agg: str, lens: list[int], totals: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(factor turning grpo_loss's within-call aggregation into the global one, global per-token weights)."""
    T, n_ne, B, lmax = (max(float(x), 1.0) for x in totals.tolist())
    len_t = torch.tensor(lens, dtype=torch.float32)
    if agg == "token-mean":
        scale, w_B = sum(lens) / T, torch.full((len(lens),), 1.0 / T)
    elif agg == "seq-mean-token-mean":
        scale = float(sum(x > 0 for x in lens)) / n_ne
        w_B = torch.where(len_t > 0, 1.0 / (n_ne * len_t.clamp(min=1)), 0.0)
    else:
        scale, w_B = len(lens) * max(max(lens, default=0), 1) / (B * lmax), torch.full((len(lens),), 1.0 / (B * lmax))
    return scale, w_B.repeat_interleave(torch.tensor(lens, dtype=torch.int64))
