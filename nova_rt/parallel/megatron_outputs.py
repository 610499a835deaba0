"""The last pipeline stage's per-micro-batch work over vocab-parallel logits, for MegatronBackend: token log-probs
at a temperature (and entropy, and GRPO's top-k inputs), the reward model's scores, and the loss / log-prob
reductions handed to megatron's forward-backward schedule (see nova_rt.parallel.megatron_backend's docstring).

A mixin: it reads the backend's `arch` (vocab size), `head` and `device` and holds no state of its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nova_rt.data.micro_batch import output_options
from nova_rt.parallel import packed


class LastStageOutputs:
    """Per-micro-batch outputs and loss functions of the last pipeline stage (mixed into MegatronBackend)."""

    def _local_logits(self, logits_BTV: torch.Tensor, temperature: float) -> torch.Tensor:
        """(T, V/tp) fp32 logits / temperature, vocab padding columns masked. Note: megatron's vocab-parallel cross
        entropy subtracts the row max from its input in place, so anything else read from these logits comes first."""
        from megatron.core import parallel_state as ps

        logits_TV = logits_BTV[0].float()
        if temperature != 1.0:
            logits_TV = logits_TV / temperature
        local = logits_TV.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * local
        if start + local > self.arch.vocab:
            pad = torch.arange(start, start + local, device=logits_TV.device) >= self.arch.vocab
            logits_TV = logits_TV.masked_fill(pad, torch.finfo(torch.float32).min)
        return logits_TV

    @torch.no_grad()
    def _entropy(self, logits_TV: torch.Tensor) -> torch.Tensor:
        """(T,) entropy of softmax over the vocab-parallel logits (no gradient: a statistic)."""
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        m_T = logits_TV.max(-1).values
        dist.all_reduce(m_T, op=dist.ReduceOp.MAX, group=group)
        e_TV = torch.exp(logits_TV - m_T[:, None])
        sums = torch.stack([e_TV.sum(-1), (e_TV * logits_TV).sum(-1)])
        dist.all_reduce(sums, group=group)
        return m_T + torch.log(sums[0]) - sums[1] / sums[0]

    def _token_outputs(self, row, logits_BTV, temperature: float, entropy: bool, at_ref_topk: bool = False,
                       topk: int = 0) -> dict:
        """{"logprobs": (T,) fp32 log p(targets[t]) at temperature, 0 where targets[t] = -100 (with grad);
        "entropy": (T,) when asked}; T = the row's length before padding. A PackedBatch's own temperature / entropy
        override the arguments. At the N target positions (targets != -100, in order), see `_topk_outputs`:
        with at_ref_topk "topk_logprobs" (N, K) at the micro-batch's ref_topk_ids where set (with grad), or with
        topk > 0 "topk_ids" and "topk_logprobs" (N, topk) of the topk most likely ids (no grad)."""
        from megatron.core import tensor_parallel

        temperature, entropy = output_options(row.source, temperature, entropy)
        logits_TV = self._local_logits(logits_BTV, temperature)
        out = {"entropy": self._entropy(logits_TV)[: row.length]} if entropy else {}
        mask_T = row.targets != packed.IGNORE_INDEX
        ref_topk_ids = row.source.ref_topk_ids if at_ref_topk else None
        if topk or ref_topk_ids is not None:  # before the cross entropy shifts logits_TV
            out.update(self._topk_outputs(logits_TV[mask_T], ref_topk_ids, topk))
        nll_T = tensor_parallel.vocab_parallel_cross_entropy(logits_TV.unsqueeze(1),
                                                             row.targets.clamp(min=0).unsqueeze(1)).squeeze(1)
        out["logprobs"] = torch.where(mask_T, -nll_T, 0.0)[: row.length]
        return out

    def _topk_outputs(self, logits_NV: torch.Tensor, ids_NK: torch.Tensor | None, topk: int) -> dict:
        """The GRPO top-k KL's inputs over vocab-parallel logits (nova_rt.parallel.vocab_parallel), the same numbers
        as the HF path's fused_linear_logprobs(topk_ids=...) / reference_topk: full-vocab log-softmax at given ids,
        or the topk best ids (capped at the vocabulary size; ties by lowest id) and their log-probs. logits_NV: this
        rank's columns at the target rows, a copy (megatron's cross entropy later shifts the full logits in place)."""
        from megatron.core import parallel_state as ps

        from nova_rt.parallel.vocab_parallel import vocab_parallel_logprobs_at, vocab_parallel_topk

        group = ps.get_tensor_model_parallel_group()
        start = ps.get_tensor_model_parallel_rank() * logits_NV.shape[-1]
        if topk:
            ids_NK, lp_NK = vocab_parallel_topk(logits_NV.detach(), min(topk, self.arch.vocab), vocab_start=start,
                                                vocab_size=self.arch.vocab, group=group)
            return {"topk_ids": ids_NK, "topk_logprobs": lp_NK}
        return {"topk_logprobs": vocab_parallel_logprobs_at(logits_NV, ids_NK.to(logits_NV.device),
                                                            vocab_start=start, group=group)}

    @staticmethod
    def _score_outputs(row, scores_BT1) -> dict:
        """{"scores": (S,) fp32 head output at the last token of each document}; the step's padding document (which
        starts at the row's true length) is left out."""
        ends_S = row.cu_seqlens[1:].long()
        ends_S = ends_S[ends_S <= row.length]
        return {"scores": scores_BT1[0, ends_S - 1, 0].float()}

    def _outputs(self, row, output_BTX, opts: dict) -> dict:
        """opts: `_token_outputs`'s keyword arguments (temperature, entropy, at_ref_topk, topk)."""
        if self.head == "score":
            return self._score_outputs(row, output_BTX)
        return self._token_outputs(row, output_BTX, **opts)

    def _stage_loss_func(self, loss_fn, opts, row, logits_BTV, non_loss_data: bool = False):
        loss, stats = loss_fn(self._outputs(row, logits_BTV, opts), row.source)
        reduced = {k: float(v) for k, v in stats.items()}
        reduced["loss"] = float(loss.detach())
        return loss, torch.ones((), dtype=torch.int), reduced

    def _stage_forward_func(self, fn, opts, row, logits_BTV, non_loss_data: bool = True):
        return fn(self._outputs(row, logits_BTV, opts), row.source)

    def _token_loss(self, targets_T: torch.Tensor, logits_BTV: torch.Tensor) -> torch.Tensor:
        """-log p(target) per position, (T,) fp32, over vocab-parallel logits with padded columns masked."""
        from megatron.core import tensor_parallel

        logits_TV = self._local_logits(logits_BTV, 1.0)
        target = targets_T.clamp(min=0)
        return tensor_parallel.vocab_parallel_cross_entropy(logits_TV.unsqueeze(1), target.unsqueeze(1)).squeeze(1)

    def _loss_func(self, row, logits_BTV, non_loss_data: bool = False):
        loss_T = self._token_loss(row.targets, logits_BTV)
        mask = (row.targets != packed.IGNORE_INDEX).float()
        loss_sum = (loss_T * mask).sum()
        tokens = mask.sum().to(torch.int)
        return loss_sum, tokens, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach()}

    def _logprob_func(self, row, logits_BTV, non_loss_data: bool = True):
        if row.cp_index is not None:
            return self._logprob_func_cp(row, logits_BTV)
        next_ids_T = torch.roll(row.input_ids, -1)  # the last position's target is unused
        nll_T = self._token_loss(next_ids_T, logits_BTV)
        logp_T = torch.zeros(row.length, dtype=torch.float32, device=nll_T.device)
        logp_T[1:] = -nll_T[: row.length - 1]
        starts = row.cu_seqlens[:-1].long()
        logp_T[starts[starts < row.length]] = 0.0  # document starts have no prediction (padding excluded)
        return logp_T

    def _logprob_func_cp(self, row, logits_BTV) -> torch.Tensor:
        """`_logprob_func` under context parallelism: each rank scores the next original token after each token it
        holds (none after a document's last token or after padding), and the CP group's values are all-gathered and
        placed at their original positions."""
        from megatron.core import parallel_state as ps

        T, idx_L = row.length, row.cp_index
        ids_T = row.source["input_ids"].to(self.device, torch.int64)
        starts = torch.zeros(T + 1, dtype=torch.bool, device=self.device)
        starts[packed.validate(row.source)[:-1].to(self.device)] = True
        starts[T] = True
        nxt_L = idx_L + 1
        valid_L = (idx_L >= 0) & ~starts[nxt_L.clamp(max=T)]
        next_ids_L = torch.where(valid_L, ids_T[nxt_L.clamp(max=T - 1)], 0)
        logp_L = torch.where(valid_L, -self._token_loss(next_ids_L, logits_BTV), 0.0)
        group = ps.get_context_parallel_group()
        logp_all = [torch.empty_like(logp_L) for _ in range(group.size())]
        where_all = [torch.empty_like(nxt_L) for _ in range(group.size())]
        dist.all_gather(logp_all, logp_L.contiguous(), group=group)
        dist.all_gather(where_all, torch.where(valid_L, nxt_L, T).contiguous(), group=group)  # T: a scratch slot
        logp_T = torch.zeros(T + 1, dtype=torch.float32, device=self.device)
        logp_T[torch.cat(where_all)] = torch.cat(logp_all)
        return logp_T[:T]
