"""A causal LM wrapped so that its forward returns per-token log-probs of given targets (never the logits).

The wrapper is what DDP/FSDP wrap: the whole loss path (decoder, LM head, fused log-prob op) runs inside
forward, so gradient synchronisation hooks see it. The decoder is called with packed-sequence keywords, so each
document of a packed row attends only to itself.
"""

from __future__ import annotations

import torch
from torch import nn

from nova_rt.data.chat import IGNORE
from nova_rt.models.attention import packed_forward_kwargs


class CausalLMLogprobs(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen, shared_prefix=None) -> torch.Tensor:
        """(T, D) final hidden states of one flat packed row (optionally in the shared-prefix layout)."""
        decoder = self.lm.get_decoder()
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                      **packed_forward_kwargs(cu_seqlens, max_seqlen, shared_prefix))
        return out.last_hidden_state[0]

    def head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(V, D) LM-head weight in the hidden states' dtype (bf16 autocast on GPU: fp32 master weights)."""
        weight_VD = self.lm.get_output_embeddings().weight
        return weight_VD if weight_VD.dtype == dtype else weight_VD.to(dtype)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, targets, *, temperature: float = 1.0,
                return_entropy: bool = False, topk_ids=None) -> dict:
        from nova_rt.kernels.fused_linear_logprobs import fused_linear_logprobs

        hidden_TD = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        weight_VD = self.head_weight(hidden_TD.dtype)
        if return_entropy or topk_ids is not None:  # per-token outputs wanted on every row
            return fused_linear_logprobs(hidden_TD, weight_VD, targets, temperature=temperature,
                                         return_entropy=return_entropy, topk_ids=topk_ids)
        # log-probs only: the LM head runs on rows with a target alone (SFT: prompt tokens and the last token of
        # each document have none; that is ~20-25% of the model's FLOPs on them for a 50k vocab), and the (T,)
        # result is 0 elsewhere, as the op's contract says for ignored rows
        keep_T = targets != IGNORE
        sel = fused_linear_logprobs(hidden_TD[keep_T], weight_VD, targets[keep_T], temperature=temperature)
        logp_T = sel["logprobs"].new_zeros(targets.shape).masked_scatter(keep_T, sel["logprobs"])
        return {"logprobs": logp_T}


def batch_logprobs(model: nn.Module, batch: dict, **kwargs) -> dict:
    """Run a (possibly DDP-wrapped) CausalLMLogprobs on a collated micro-batch."""
    return model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"],
                 batch["targets"], **kwargs)


class PolicyLogprobs(CausalLMLogprobs):
    """CausalLMLogprobs that runs the LM head only on rows with a target (response / supervised tokens): on
    RL batches most tokens are prompt, whose logits nothing needs. Outputs are (n_targets,) / (n_targets, K)."""

    def selected_hidden(self, input_ids, position_ids, cu_seqlens, max_seqlen, targets,
                        shared_prefix=None) -> torch.Tensor:
        return self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, shared_prefix)[targets != IGNORE]

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, targets, *, temperature: float = 1.0,
                return_entropy: bool = False, topk_ids=None, shared_prefix=None) -> dict:
        from nova_rt.kernels.fused_linear_logprobs import fused_linear_logprobs

        hidden_TD = self.selected_hidden(input_ids, position_ids, cu_seqlens, max_seqlen, targets, shared_prefix)
        weight_VD = self.head_weight(hidden_TD.dtype)
        return fused_linear_logprobs(hidden_TD, weight_VD, targets[targets != IGNORE], temperature=temperature,
                                     return_entropy=return_entropy, topk_ids=topk_ids)


def policy_forward(model, mb: dict, **kw) -> dict:
    """Run a (possibly DDP-wrapped) PolicyLogprobs on a collated micro-batch (its shared-prefix layout too)."""
    if mb.get("shared_prefix") is not None:
        kw["shared_prefix"] = mb["shared_prefix"]
    return model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"], mb["targets"], **kw)
