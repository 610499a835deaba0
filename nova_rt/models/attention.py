"""nova_rt's packed attention as a transformers attention function ("nova_packed").

Packed training passes one flat row per micro-batch: input_ids (1, T), position_ids restarting at 0 per document,
and `cu_seq_lens_q` (int32, S+1) with `max_length_q` (transformers' flash-attention keyword names). HF decoder
layers forward them here and `packed_attention` runs (Triton on CUDA, PyTorch on CPU); a custom implementation name
makes transformers skip mask creation, so no (T, T) mask is ever built.

Without `cu_seq_lens_q` (unpacked forward, generation) the call falls through to SDPA with transformers' mask (None
here): causal per row, correct for unpadded rows; padded batched generation must use attn_impl="sdpa". A row may
carry a `shared_prefix` layout (SharedPrefixLayout, nova_rt.stages.grpo.pack_responses): one prompt followed by G
responses that each attend to the whole prompt and causally to themselves, not to each other, so a shared prompt
goes through the model once; each group is one masked SDPA call (docs/architecture.md#packed-sequences).

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
    """Groups of a flat packed row: `spans[g] = (start, end)` token offsets and `segments[g]` (L,) the segment of
    each token of group g (0 = the shared prefix, 1.. = the responses). Token t of a group may attend to every
    earlier prefix token and to the earlier tokens of its own segment; mask(g) builds that (L, L) boolean mask
    (True = may attend) when a layer needs it, so only one group's mask is alive at a time."""

    spans: list[tuple[int, int]]
    segments: list[torch.Tensor]

    @staticmethod
    def build(groups: list[tuple[int, list[int]]]) -> SharedPrefixLayout:
        """From [(prefix_len, [segment lens])] in row order."""
        spans, segments, off = [], [], 0
        for a, segs in groups:
            L = a + sum(segs)
            segments.append(torch.repeat_interleave(torch.arange(len(segs) + 1), torch.tensor([a, *segs])))
            spans.append((off, off + L))
            off += L
        return SharedPrefixLayout(spans, segments)

    def mask(self, g: int) -> torch.Tensor:
        seg = self.segments[g]
        idx = torch.arange(seg.shape[0], device=seg.device)
        return (idx[:, None] >= idx[None, :]) & ((seg[:, None] == seg[None, :]) | (seg[None, :] == 0))

    def to(self, device) -> SharedPrefixLayout:
        return SharedPrefixLayout(self.spans, [s.to(device) for s in self.segments])


def shared_prefix_attention(q_BNTH, k_BNTH, v_BNTH, layout: SharedPrefixLayout, scaling) -> torch.Tensor:
    """(1, T, N, H) attention of a row in the shared-prefix layout: one masked SDPA per group (GQA in SDPA)."""
    outs = []
    for g, (s, e) in enumerate(layout.spans):
        outs.append(F.scaled_dot_product_attention(
            q_BNTH[:, :, s:e], k_BNTH[:, :, s:e].to(q_BNTH.dtype), v_BNTH[:, :, s:e].to(q_BNTH.dtype),
            attn_mask=layout.mask(g), scale=scaling, enable_gqa=k_BNTH.shape[1] != q_BNTH.shape[1]))
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
