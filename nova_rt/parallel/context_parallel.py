"""Context parallelism (CP) for packed (thd) rows on nova_rt's own core attention: no Transformer Engine, runs on gloo.

Split: Megatron/TE's load-balanced thd layout. Every document of a packed row is padded at its end (ignored tokens)
to a multiple of 2*CP and cut into 2*CP equal chunks; CP rank r holds chunks r and 2*CP-1-r of every document, so
under the causal mask each rank gets the same share of the attention work. RoPE needs nothing here: megatron's thd
RoPE rotates each local chunk with its global positions given the padded cu_seqlens.

Attention (`context_parallel_attention`): K and V of the local tokens are all-gathered over the CP group (backward:
reduce-scatter), put back in global order, and each rank attends its local queries to the keys of their document
under the causal mask in global positions. All-gather CP (as in Llama 3's training) rather than ring attention:
simpler and exact. Worked example and reasons: docs/parallelism.md#context-parallelism-in-detail.

Legend: T tokens of the padded global row, L tokens held by this rank (T / CP), N heads, H head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_documents(cu_seqlens: torch.Tensor, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every document padded to a multiple of 2*cp. cu_seqlens: (S+1,) int64 CPU, no empty documents.
    Returns the padded cu_seqlens (S+1,) int64 and index_T: for each padded position, the original token position
    it holds, or -1 for padding."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    step = 2 * cp
    padded = [-(-n // step) * step for n in lengths]
    index = []
    for start, n, p in zip(cu_seqlens[:-1].tolist(), lengths, padded):
        index += [torch.arange(start, start + n), torch.full((p - n,), -1)]
    cu = torch.tensor([0] + padded, dtype=torch.int64).cumsum(0)
    return cu, torch.cat(index).to(torch.int64)


def local_positions(cu_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """(T / cp,) positions in the padded global row of the tokens CP rank `rank` holds: chunks rank and
    2*cp-1-rank of every document, documents in order. cu_padded: (S+1,) with every length a multiple of 2*cp."""
    parts = []
    for start, end in zip(cu_padded[:-1].tolist(), cu_padded[1:].tolist()):
        c = (end - start) // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def gathered_order(cu_padded: torch.Tensor, cp: int) -> torch.Tensor:
    """(T,) for each global position, its row in the rank-major all-gather of the ranks' local tokens."""
    gathered = torch.cat([local_positions(cu_padded, cp, r) for r in range(cp)])
    order = torch.empty_like(gathered)
    order[gathered] = torch.arange(gathered.numel())
    return order


def context_parallel_attention(q_LNH: torch.Tensor, k_LNH: torch.Tensor, v_LNH: torch.Tensor,
                               cu_padded: torch.Tensor, *, softmax_scale: float, group) -> torch.Tensor:
    """Causal attention of this CP rank's queries to the keys of their documents, all CP ranks' tokens included.

    q_LNH: (L, N, H) this rank's queries in the layout of `local_positions`; k_LNH, v_LNH: (L, Nkv, H) (GQA: N a
    multiple of Nkv); cu_padded: (S+1,) cu_seqlens of the padded global row. Returns (L, N, H)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    cp, rank = group.size(), group.rank()
    k_TNH = gather_from_sequence_parallel_region(k_LNH, tensor_parallel_output_grad=True, group=group)
    v_TNH = gather_from_sequence_parallel_region(v_LNH, tensor_parallel_output_grad=True, group=group)
    cu = cu_padded.to("cpu", torch.int64)
    order = gathered_order(cu, cp).to(k_TNH.device)
    k_TNH, v_TNH = k_TNH.index_select(0, order), v_TNH.index_select(0, order)
    groups = q_LNH.shape[1] // k_LNH.shape[1]
    outs, local = [], 0
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        c = (end - start) // (2 * cp)
        if c == 0:
            continue
        pos_q = torch.cat([torch.arange(rank * c, (rank + 1) * c),
                           torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]).to(q_LNH.device)
        keys = (2 * cp - rank) * c  # this rank's last query sits at keys - 1: later keys are all masked
        q = q_LNH[local:local + 2 * c].transpose(0, 1)
        k = k_TNH[start:start + keys].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = v_TNH[start:start + keys].transpose(0, 1).repeat_interleave(groups, dim=0)
        mask = torch.arange(keys, device=q.device)[None, :] <= pos_q[:, None]
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale).transpose(0, 1))
        local += 2 * c
    return torch.cat(outs, dim=0)
