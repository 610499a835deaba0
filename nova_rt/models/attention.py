"""nova_rt's packed attention as a transformers attention function ("nova_packed").

Packed training passes one flat row per micro-batch: input_ids (1, T), position_ids restarting at 0 per document,
and `cu_seq_lens_q` (int32, S+1) with `max_length_q`, the same keyword names transformers' flash-attention path uses.
HF decoder layers forward those keywords to the attention function, which calls `packed_attention` (Triton on
CUDA, the PyTorch path on CPU), so no (T, T) mask is ever built by transformers: a custom implementation name that
is not in the mask registry makes transformers skip mask creation.

Without `cu_seq_lens_q` (a plain unpacked forward, or generation) the call falls through to SDPA with whatever
mask transformers passed (None for this implementation), i.e. causal attention over each row: correct for unpadded
rows. Batched generation with padding must use attn_impl="sdpa" (the rollout code switches to it).

Legend: B batch rows, N heads, T tokens, H head dim.
"""

from __future__ import annotations

import torch

NAME = "nova_packed"
_registered = False


def nova_packed_attention(module, query_BNTH, key_BNTH, value_BNTH, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query_BNTH, key_BNTH, value_BNTH, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if query_BNTH.shape[0] != 1:
        raise ValueError("packed attention expects one flat row per micro-batch (batch dim 1), "
                         f"got query of shape {tuple(query_BNTH.shape)}")
    if dropout:
        raise ValueError("attention dropout is not supported by nova packed attention; set it to 0")
    from nova_rt.kernels.packed_attention import packed_attention

    max_len = kwargs.get("max_length_q")
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    # Under CPU autocast the projections can come out in different dtypes; attention runs in the query's.
    q_TNH = query_BNTH[0].transpose(0, 1)
    k_TNH = key_BNTH[0].transpose(0, 1).to(q_TNH.dtype)
    v_TNH = value_BNTH[0].transpose(0, 1).to(q_TNH.dtype)
    out_TNH = packed_attention(q_TNH, k_TNH, v_TNH, cu.to(torch.int32), int(max_len), causal=True,
                               softmax_scale=scaling)
    return out_TNH.unsqueeze(0), None


def register_nova_attention() -> str:
    """Register "nova_packed" with transformers (idempotent) and return the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, nova_packed_attention)
        _registered = True
    return NAME


def packed_forward_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """Keyword arguments that route a packed row through nova_packed (and through transformers' FA2 varlen)."""
    cu = cu_seqlens.to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": int(max_seqlen), "max_length_k": int(max_seqlen)}
