"""Top-k ids and log-probs at given ids over vocab-parallel logits (each tensor-parallel rank holds a column shard).

Legend: T tokens, Vl vocab columns of this rank's shard (global ids vocab_start .. vocab_start + Vl - 1), K ids per
token. The logits are already divided by the temperature (megatron_outputs.local_logits); padding columns of a padded
vocab must be masked to a very negative value by the caller, so they never rank and add nothing to the softmax.

    lse[t]        m + log all-reduce(sum exp(z - m)) with m = all-reduce(max z) over every rank's columns.
    logprobs_at   lp[t, k] = z[t, ids[t, k]] - lse[t]; backward dz_local[t, v] = sum_k g[t, k] 1[v == ids[t, k]]
                  - p[t, v] sum_k g[t, k], with no collective (g is the same on every rank of the group).
    topk          every rank ends with the same (T, K) ids and log-probs, sorted descending, ties by lowest id (the
                  HF path's rule), so the ids do not depend on TP.

logprobs_at saves the (T, Vl) logits (a separate tensor such as logits[mask]: megatron's cross entropy edits its
input in place), lse and the ids; no (T, V) tensor exists on any rank. Why and how: docs/parallelism.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nova_rt.kernels.topk_select import topk_lowest_ids


def vocab_parallel_logsumexp(logits_TV: torch.Tensor, group) -> torch.Tensor:
    """(T,) logsumexp over the columns of every rank of `group` (no gradient)."""
    with torch.no_grad():
        m_T = logits_TV.amax(dim=-1)
        dist.all_reduce(m_T, op=dist.ReduceOp.MAX, group=group)
        s_T = torch.exp(logits_TV - m_T[:, None]).sum(dim=-1)
        dist.all_reduce(s_T, group=group)
        return m_T + torch.log(s_T)


class _LogprobsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TV, ids_TK, vocab_start: int, group):
        lse_T = vocab_parallel_logsumexp(logits_TV, group)
        local_TK = ids_TK - vocab_start
        inside_TK = (local_TK >= 0) & (local_TK < logits_TV.shape[-1])
        local_TK = torch.where(inside_TK, local_TK, 0)
        z_TK = torch.where(inside_TK, logits_TV.gather(1, local_TK), 0.0)
        dist.all_reduce(z_TK, group=group)
        ctx.save_for_backward(logits_TV, lse_T, local_TK, inside_TK)
        return z_TK - lse_T[:, None]

    @staticmethod
    def backward(ctx, g_TK):
        logits_TV, lse_T, local_TK, inside_TK = ctx.saved_tensors
        g_TK = g_TK.to(logits_TV.dtype)
        dz_TV = torch.exp(logits_TV - lse_T[:, None]).mul_(-g_TK.sum(dim=-1, keepdim=True))
        dz_TV.scatter_add_(1, local_TK, torch.where(inside_TK, g_TK, 0.0))
        return dz_TV, None, None, None


def vocab_parallel_logprobs_at(logits_TV: torch.Tensor, ids_TK: torch.Tensor, *, vocab_start: int,
                               group) -> torch.Tensor:
    """(T, K) log-softmax over the whole (sharded) vocab at global ids_TK, identical on every rank of `group`;
    differentiable w.r.t. this rank's logits_TV (T, Vl). Computed in the logits' dtype (fp32 / fp64)."""
    if ids_TK.dim() != 2 or ids_TK.shape[0] != logits_TV.shape[0]:
        raise ValueError(f"ids must be (T={logits_TV.shape[0]}, K); got {tuple(ids_TK.shape)}")
    return _LogprobsAt.apply(logits_TV, ids_TK.to(logits_TV.device, torch.int64), int(vocab_start), group)


@torch.no_grad()
def vocab_parallel_topk(logits_TV: torch.Tensor, k: int, *, vocab_start: int, vocab_size: int,
                        group) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (T, k) int64 global, log-probs (T, k) in the logits' dtype) of the k largest logits per token over the
    whole vocab, sorted descending, ties by lowest id; identical on every rank of `group`.

    vocab_size: the number of real ids over all shards (k must not exceed it). Shards may differ in width (>= 1).
    """
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={vocab_size}], got {k}")
    T, Vl = logits_TV.shape
    lse_T = vocab_parallel_logsumexp(logits_TV, group)
    kk = min(k, Vl)
    vals_TK, ids_TK = topk_lowest_ids(logits_TV, kk)
    ids_TK = ids_TK + vocab_start
    if kk < k:  # a narrow shard: pad to k candidates that never win (every rank sends the same shape)
        vals_TK = torch.cat([vals_TK, vals_TK.new_full((T, k - kk), -torch.inf)], dim=1)
        ids_TK = torch.cat([ids_TK, ids_TK.new_full((T, k - kk), torch.iinfo(torch.int64).max)], dim=1)
    world = dist.get_world_size(group)
    all_vals, all_ids = [torch.empty_like(vals_TK) for _ in range(world)], [torch.empty_like(ids_TK)
                                                                          for _ in range(world)]
    dist.all_gather(all_vals, vals_TK.contiguous(), group=group)
    dist.all_gather(all_ids, ids_TK.contiguous(), group=group)
    top_TK, gids_TK = topk_lowest_ids(torch.cat(all_vals, dim=1), k, torch.cat(all_ids, dim=1))
    return gids_TK, top_TK - lse_T[:, None]
