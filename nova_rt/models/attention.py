"""nova_rt's packed attention as a transformers attention function ("nova_packed").

Packed training passes one flat row per micro-batch: input_ids (1, T), position_ids restarting at 0 per document,
and `cu_seq_lens_q` (int32, S+1) with `max_length_q`, the same keyword names transformers' flash-attention path uses.
HF decoder layers forward those keywords to the attention function, which calls `packed_attention` (Triton on
CUDA, the PyTorch path on CPU), so no (T, T) mask is ever built by transformers: a custom implementation name that
is not in the mask registry makes transformers skip mask creation.

Without `cu_seq_lens_q` (a plain unpacked forward, or generation) the call falls through to SDPA with whatever
mask transformers passed (None for this implementation), i.e. causal attention over each row: correct for unpadded
rows. Batched generation with padding must use attn_impl="sdpa" (the rollout code switches to it).

A row may also carry a `shared_prefix` layout (SharedPrefixLayout, built by nova_rt.stages.grpo.pack_responses):
groups of one prompt followed by several responses that each attend to the whole prompt and causally to themselves,
but not to each other, so a prompt shared by G sampled responses goes through the model once instead of G times.
Each group is then one masked SDPA call (the mask is built once per micro-batch, not per layer).

Legend: B batch rows, N heads, T tokens, H head dim, L tokens of one group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "nova_packed"
_registered = False


@dataclass
class SharedPrefixLayout:
    """Groups of a flat packed row: `spans[g] = (start, end)` token offsets, `masks[g]` the (L, L) boolean mask
    (True = may attend) of group g. Token t of a group sees: every earlier prefix token if t is in the prefix;
    the whole prefix and the earlier tokens of its own segment if t is in a response segment."""

    spans: list[tuple[int, int]]
    masks: list[torch.Tensor]

    @staticmethod
    def build(groups: list[tuple[int, list[int]]]) -> "SharedPrefixLayout":
        """From [(prefix_len, [segment lens])] in row order."""
        spans, masks, off = [], [], 0
        for a, segs in groups:
            L = a + sum(segs)
            seg_id = torch.repeat_interleave(torch.arange(len(segs) + 1), torch.tensor([a, *segs]))
            idx = torch.arange(L)
            causal = idx[:, None] >= idx[None, :]
            same = seg_id[:, None] == seg_id[None, :]
            to_prefix = (seg_id[None, :] == 0).expand(L, L)
            masks.append(causal & (same | to_prefix))
            spans.append((off, off + L))
            off += L
        return SharedPrefixLayout(spans, masks)

    def to(self, device) -> "SharedPrefixLayout":
        return SharedPrefixLayout(self.spans, [m.to(device) for m in self.masks])


def shared_prefix_attention(q_BNTH, k_BNTH, v_BNTH, layout: SharedPrefixLayout, scaling) -> torch.Tensor:
    """(1, T, N, H) attention of a row in the shared-prefix layout: one masked SDPA per group (GQA in SDPA)."""
    outs = []
    for (s, e), mask in zip(layout.spans, layout.masks):
        outs.append(F.scaled_dot_product_attention(
            q_BNTH[:, :, s:e], k_BNTH[:, :, s:e].to(q_BNTH.dtype), v_BNTH[:, :, s:e].to(q_BNTH.dtype),
            attn_mask=mask, scale=scaling, enable_gqa=k_BNTH.shape[1] != q_BNTH.shape[1]))
    return torch.cat(outs, dim=2).transpose(1, 2)


def nova_packed_attention(module, query_BNTH, key_BNTH, value_BNTH, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):
    layout = kwargs.get("shared_prefix")
    if layout is not None:
        if dropout:
            raise ValueError("attention dropout is not supported by nova packed attention; set it to 0")
        return shared_prefix_attention(query_BNTH, key_BNTH, value_BNTH, layout, scaling), None
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


def packed_forward_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int,
                          shared_prefix: SharedPrefixLayout | None = None) -> dict:
    """Keyword arguments that route a packed row through nova_packed (and through transformers' FA2 varlen);
    a shared-prefix layout only through nova_packed (supports_shared_prefix checks the model)."""
    cu = cu_seqlens.to(torch.int32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": int(max_seqlen), "max_length_k": int(max_seqlen)}
    if shared_prefix is not None:
        kw["shared_prefix"] = shared_prefix
    return kw


def supports_shared_prefix(model) -> bool:
    """True when `model` (an HF model) runs its attention through nova_packed, which reads the layout."""
    return getattr(model.config, "_attn_implementation", None) == NAME
