"""The last pipeline stage's per-micro-batch math over vocab-parallel logits, as plain functions of their inputs:
token log-probs at a temperature (and entropy, and GRPO's top-k inputs), the reward model's scores, the SFT loss sums
and next-token log-probs. MegatronTrainer binds them to its vocabulary and groups and hands them to megatron's
forward-backward schedule as loss functions (see nova_rt.parallel.megatron_trainer's docstring).

Arguments: `row` a padded nova_rt.parallel.packed.PackedRow (its `source` is the micro-batch as passed), `logits_BTV`
this rank's (1, T, V/tp) output columns (`scores_BT1` for a score head), `vocab_size` the true vocabulary (columns at
or past it are padding), `group` the tensor-parallel group the vocabulary is split over. Megatron's vocab-parallel
cross entropy subtracts the row max from its input in place, so anything else read from the logits is read first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from nova_rt.data.micro_batch import output_options
from nova_rt.parallel import packed


def local_logits(logits_BTV: torch.Tensor, temperature: float, vocab_size: int, group) -> torch.Tensor:
    """(T, V/tp) fp32 logits / temperature, vocab padding columns masked."""
    logits_TV = logits_BTV[0].float()
    if temperature != 1.0:
        logits_TV = logits_TV / temperature
    local = logits_TV.shape[-1]
    start = group.rank() * local
    if start + local > vocab_size:
        pad = torch.arange(start, start + local, device=logits_TV.device) >= vocab_size
        logits_TV = logits_TV.masked_fill(pad, torch.finfo(torch.float32).min)
    return logits_TV


@torch.no_grad()
def vocab_parallel_entropy(logits_TV: torch.Tensor, group) -> torch.Tensor:
    """(T,) entropy of softmax over the vocab-parallel logits (no gradient: a statistic)."""
    m_T = logits_TV.max(-1).values
    dist.all_reduce(m_T, op=dist.ReduceOp.MAX, group=group)
    e_TV = torch.exp(logits_TV - m_T[:, None])
    sums = torch.stack([e_TV.sum(-1), (e_TV * logits_TV).sum(-1)])
    dist.all_reduce(sums, group=group)
    return m_T + torch.log(sums[0]) - sums[1] / sums[0]


def topk_outputs(logits_NV: torch.Tensor, ids_NK: torch.Tensor | None, topk: int, *, vocab_size: int,
                 group) -> dict:
    """The GRPO top-k KL's inputs over vocab-parallel logits (nova_rt.parallel.vocab_parallel), the same numbers
    as the HF path's fused_linear_logprobs(topk_ids=...) / reference_topk: full-vocab log-softmax at given ids,
    or the topk best ids (capped at the vocabulary size; ties by lowest id) and their log-probs. logits_NV: this
    rank's columns at the target rows, a copy (megatron's cross entropy later shifts the full logits in place)."""
    from nova_rt.parallel.vocab_parallel import vocab_parallel_logprobs_at, vocab_parallel_topk

    start = group.rank() * logits_NV.shape[-1]
    if topk:
        ids_NK, lp_NK = vocab_parallel_topk(logits_NV.detach(), min(topk, vocab_size), vocab_start=start,
                                            vocab_size=vocab_size, group=group)
        return {"topk_ids": ids_NK, "topk_logprobs": lp_NK}
    return {"topk_logprobs": vocab_parallel_logprobs_at(logits_NV, ids_NK.to(logits_NV.device),
                                                        vocab_start=start, group=group)}


def token_outputs(row, logits_BTV: torch.Tensor, *, vocab_size: int, group, temperature: float, entropy: bool,
                  at_ref_topk: bool = False, topk: int = 0) -> dict:
    """{"logprobs": (T,) fp32 log p(targets[t]) at temperature, 0 where targets[t] = -100 (with grad);
    "entropy": (T,) when asked}; T = the row's length before padding. A PackedBatch's own temperature / entropy
    override the arguments. At the N target positions (targets != -100, in order), see `topk_outputs`:
    with at_ref_topk "topk_logprobs" (N, K) at the micro-batch's ref_topk_ids where set (with grad), or with
    topk > 0 "topk_ids" and "topk_logprobs" (N, topk) of the topk most likely ids (no grad)."""
    from megatron.core import tensor_parallel

    temperature, entropy = output_options(row.source, temperature, entropy)
    logits_TV = local_logits(logits_BTV, temperature, vocab_size, group)
    out = {"entropy": vocab_parallel_entropy(logits_TV, group)[: row.length]} if entropy else {}
    mask_T = row.targets != packed.IGNORE_INDEX
    ref_topk_ids = row.source.ref_topk_ids if at_ref_topk else None
    if topk or ref_topk_ids is not None:  # before the cross entropy shifts logits_TV
        out.update(topk_outputs(logits_TV[mask_T], ref_topk_ids, topk, vocab_size=vocab_size, group=group))
    nll_T = tensor_parallel.vocab_parallel_cross_entropy(logits_TV.unsqueeze(1),
                                                         row.targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    out["logprobs"] = torch.where(mask_T, -nll_T, 0.0)[: row.length]
    return out


def score_outputs(row, scores_BT1: torch.Tensor) -> dict:
    """{"scores": (S,) fp32 head output at the last token of each document}; the step's padding document (which
    starts at the row's true length) is left out."""
    ends_S = row.cu_seqlens[1:].long()
    ends_S = ends_S[ends_S <= row.length]
    return {"scores": scores_BT1[0, ends_S - 1, 0].float()}


def stage_outputs(row, output_BTX: torch.Tensor, *, head: str, vocab_size: int, group, **options) -> dict:
    """`score_outputs` for head="score", else `token_outputs` with `options` (temperature, entropy, at_ref_topk,
    topk): what a stage's loss_fn / forward fn receives for one micro-batch."""
    if head == "score":
        return score_outputs(row, output_BTX)
    return token_outputs(row, output_BTX, vocab_size=vocab_size, group=group, **options)


def stage_loss(loss_fn: Callable, outputs: Callable, row, logits_BTV: torch.Tensor, non_loss_data: bool = False):
    """megatron's loss function for a stage loss: loss_fn(outputs(row, logits), micro-batch) -> (loss, stats), the
    loss counted as one unit (it is normalised by its global batch already) and the stats as floats plus "loss"."""
    loss, stats = loss_fn(outputs(row, logits_BTV), row.source)
    reduced = {k: float(v) for k, v in stats.items()}
    reduced["loss"] = float(loss.detach())
    return loss, torch.ones((), dtype=torch.int), reduced


def stage_forward(fn: Callable, outputs: Callable, row, logits_BTV: torch.Tensor, non_loss_data: bool = True):
    """megatron's non-loss-data function of a forward-only pass: fn(outputs(row, logits), micro-batch)."""
    return fn(outputs(row, logits_BTV), row.source)


def token_nll(targets_T: torch.Tensor, logits_BTV: torch.Tensor, *, vocab_size: int, group) -> torch.Tensor:
    """-log p(target) per position, (T,) fp32, over vocab-parallel logits with padded columns masked."""
    from megatron.core import tensor_parallel

    logits_TV = local_logits(logits_BTV, 1.0, vocab_size, group)
    target = targets_T.clamp(min=0)
    return tensor_parallel.vocab_parallel_cross_entropy(logits_TV.unsqueeze(1), target.unsqueeze(1)).squeeze(1)


def sft_loss(row, logits_BTV: torch.Tensor, non_loss_data: bool = False, *, vocab_size: int, group):
    """megatron's loss function for the token-mean next-token loss: (sum of -log p over the supervised tokens,
    their count, both for the step's totals); megatron divides by the global count (calculate_per_token_loss)."""
    loss_T = token_nll(row.targets, logits_BTV, vocab_size=vocab_size, group=group)
    mask = (row.targets != packed.IGNORE_INDEX).float()
    loss_sum = (loss_T * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach()}


def next_token_logprobs(row, logits_BTV: torch.Tensor, non_loss_data: bool = True, *, vocab_size: int, group,
                        context_group) -> torch.Tensor:
    """(T,) fp32 log p(input_ids[t] | earlier tokens of its document), 0 at document starts; under context
    parallelism (row.cp_index set) gathered over `context_group` (`_next_token_logprobs_cp`)."""
    if row.cp_index is not None:
        return _next_token_logprobs_cp(row, logits_BTV, vocab_size=vocab_size, group=group,
                                       context_group=context_group)
    next_ids_T = torch.roll(row.input_ids, -1)  # the last position's target is unused
    nll_T = token_nll(next_ids_T, logits_BTV, vocab_size=vocab_size, group=group)
    logp_T = torch.zeros(row.length, dtype=torch.float32, device=nll_T.device)
    logp_T[1:] = -nll_T[: row.length - 1]
    starts = row.cu_seqlens[:-1].long()
    logp_T[starts[starts < row.length]] = 0.0  # document starts have no prediction (padding excluded)
    return logp_T


def _next_token_logprobs_cp(row, logits_BTV: torch.Tensor, *, vocab_size: int, group,
                            context_group) -> torch.Tensor:
    """`next_token_logprobs` under context parallelism: each rank scores the next original token after each token
    it holds (none after a document's last token or after padding), and the CP group's values are all-gathered and
    placed at their original positions."""
    device = logits_BTV.device
    T, idx_L = row.length, row.cp_index
    ids_T = row.source["input_ids"].to(device, torch.int64)
    starts = torch.zeros(T + 1, dtype=torch.bool, device=device)
    starts[packed.validate(row.source)[:-1].to(device)] = True
    starts[T] = True
    nxt_L = idx_L + 1
    valid_L = (idx_L >= 0) & ~starts[nxt_L.clamp(max=T)]
    next_ids_L = torch.where(valid_L, ids_T[nxt_L.clamp(max=T - 1)], 0)
    logp_L = torch.where(valid_L, -token_nll(next_ids_L, logits_BTV, vocab_size=vocab_size, group=group), 0.0)
    logp_all = [torch.empty_like(logp_L) for _ in range(context_group.size())]
    where_all = [torch.empty_like(nxt_L) for _ in range(context_group.size())]
    dist.all_gather(logp_all, logp_L.contiguous(), group=context_group)
    dist.all_gather(where_all, torch.where(valid_L, nxt_L, T).contiguous(), group=context_group)  # T: scratch slot
    logp_T = torch.zeros(T + 1, dtype=torch.float32, device=device)
    logp_T[torch.cat(where_all)] = torch.cat(logp_all)
    return logp_T[:T]
