"""Deterministic top-k selection: the k largest values per row with ties broken by lowest id, and the top-k ids of
an LM head's logits streamed over the vocabulary (GRPO's reference top-k, whose ids fused_linear_logprobs then
evaluates under the policy with `topk_ids=`).

Legend: T tokens (rows), N candidates per row, D model dim, V vocab, k ids kept per row, Vc vocab columns of one chunk.

Why deterministic: torch.topk's choice among equal values depends on the device and the kernel, so a vocab-parallel
(sharded) top-k and a single-device one could keep different ids; `topk_lowest_ids` ranks equal values by id, lowest
first, and nova_rt.parallel.vocab_parallel applies the same rule per shard and across shards.

`reference_topk` (the name says whose top-k: the reference model's, not a reference implementation) is PyTorch on
both paths: chunked GEMM + streaming merge of each chunk with the running top-k, and an online logsumexp, so no
(T, V) tensor exists; it runs under no_grad.
"""

from __future__ import annotations

import torch

from nova_rt.kernels import resolve_impl, vocab_chunks


def topk_lowest_ids(vals_TN: torch.Tensor, k: int, ids_TN: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(values (T, k), ids (T, k)): the k largest of each row, sorted descending, equal values ordered by id (lowest
    first) and, where the k-th value ties with values left out, the lowest ids kept. ids_TN: the candidates' ids
    (distinct per row; default: the column index). Deterministic, unlike torch.topk, whose choice among ties depends
    on the device and the kernel; so a sharded (vocab-parallel) top-k picks the same ids as a single-device one.

    Cost: torch.topk, one comparison pass over the rows, and a sort of the k winners; rows with a tie at the k-th
    value are re-ranked by a full stable sort (only those rows).
    """
    top_Tk, pos_Tk = torch.topk(vals_TN, k, dim=1)
    if k:
        tied_T = (vals_TN >= top_Tk[:, -1:]).sum(dim=1) > k  # the k-th value also occurs outside the selection
        if bool(tied_T.any()):
            rows = tied_T.nonzero()[:, 0]
            sub_TN = vals_TN[rows]
            order_TN = torch.arange(sub_TN.shape[1], device=sub_TN.device).expand_as(sub_TN) if ids_TN is None \
                else ids_TN[rows].argsort(dim=1)
            by_val_TN = torch.sort(sub_TN.gather(1, order_TN), dim=1, descending=True, stable=True).indices
            pos_Tk[rows] = order_TN.gather(1, by_val_TN[:, :k])
            top_Tk[rows] = sub_TN.gather(1, pos_Tk[rows])
    ids_Tk = pos_Tk if ids_TN is None else ids_TN.gather(1, pos_Tk)
    ids_Tk, order_Tk = ids_Tk.sort(dim=1)  # canonical order within the winners: by id, then stably by value
    top_Tk = top_Tk.gather(1, order_Tk)
    top_Tk, order_Tk = torch.sort(top_Tk, dim=1, descending=True, stable=True)
    return top_Tk, ids_Tk.gather(1, order_Tk)


@torch.no_grad()
def reference_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, temperature: float = 1.0,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (T, k) int64, logprobs (T, k) fp32) of the k largest logits per token, sorted descending; ties by lowest
    id (`topk_lowest_ids`).

    Streams the vocab in chunks: each chunk's logits are merged with the running top-k (torch.topk over k + Vc
    candidates) and folded into an online logsumexp, so no (T, V) tensor exists. Both paths run this PyTorch
    loop (on the GPU it is cuBLAS GEMMs plus torch.topk); `impl` is validated for API symmetry.
    """
    impl = resolve_impl(impl, hidden, weight)
    vocab_chunks.check_inputs(hidden, weight, None, None, temperature, impl)
    T, V = hidden.shape[0], weight.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    cdt = vocab_chunks.compute_dtype(hidden.dtype)
    inv_tau = 1.0 / float(temperature)
    lse = torch.full((T,), float("-inf"), dtype=cdt, device=hidden.device)
    vals = torch.empty((T, 0), dtype=cdt, device=hidden.device)
    ids = torch.empty((T, 0), dtype=torch.int64, device=hidden.device)
    vc = max(vocab_chunks.chunk_cols(T, V, vocab_chunks.workspace_bytes(hidden.device), 32), 4 * k)  # 32 B/id
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = (hidden @ weight[v0:v1].T).to(cdt).mul_(inv_tau)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
        cand_ids = torch.arange(v0, v1, device=hidden.device).expand(T, -1)
        vals, ids = topk_lowest_ids(torch.cat([vals, z], dim=1), min(k, vals.shape[1] + v1 - v0),
                                    torch.cat([ids, cand_ids], dim=1))
    return ids, (vals - lse[:, None]).float()
