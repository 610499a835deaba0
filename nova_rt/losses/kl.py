"""KL(pi_theta || pi_ref) per token: the report's exact truncated estimator over the reference's top-k tokens, the
sampled k1/k2/k3 estimators, and the return-to-go that puts a per-token KL penalty into the token-level reward.

Exact truncated KL (Baichuan Alignment report, section 2.1), over the K ids the reference ranks highest
(`nova_rt.kernels.topk_select.reference_topk`), both models' log-probs renormalised over those ids:
    q_theta[t, k] = lp_theta[t, k] - logsumexp_k lp_theta[t, :]      (same for q_ref)
    KL_t          = sum_k exp(q_theta[t, k]) (q_theta[t, k] - q_ref[t, k])      >= 0, exact when K = V
It needs no sample from pi_theta, so it also serves the PTX term on SFT data (docs/stages.md#grpo). Gradients flow to
lp_theta only (the caller detaches the reference side).

Sampled estimators with d = lp_ref - lp_theta at the sampled token (same clamps as nova_rt.kernels.grpo_loss):
    k1 = -d,  k2 = d^2 / 2,  k3 = min(exp(d) - d - 1, 10) with d clamped to [-20, 20].

Legend: T tokens, K top-k ids per token, B responses.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3", "topk"]
"""grpo.loss.kl: the sampled estimators k1/k2/k3 (sampled_kl) or the exact truncated KL over the reference's top-k
ids."""
_LOG_RATIO_CLAMP = 20.0
_K3_MAX = 10.0


def topk_kl(policy_topk_logprobs_TK: torch.Tensor, ref_topk_logprobs_TK: torch.Tensor) -> torch.Tensor:
    """(T,) exact KL(pi_theta || pi_ref) over the reference's top-k ids, both renormalised over those ids.

    Inputs are log-probs under each model's full softmax at the same (T, K) ids (any normalisation works: only
    differences within a row matter). Computed in fp32 (fp64 for fp64 inputs); differentiable w.r.t. both inputs.
    """
    if policy_topk_logprobs_TK.shape != ref_topk_logprobs_TK.shape or policy_topk_logprobs_TK.dim() != 2:
        raise ValueError(f"policy and reference top-k log-probs must both be (T, K); got "
                         f"{tuple(policy_topk_logprobs_TK.shape)} and {tuple(ref_topk_logprobs_TK.shape)}")
    dtype = torch.float64 if policy_topk_logprobs_TK.dtype == torch.float64 else torch.float32
    q_theta_TK = torch.log_softmax(policy_topk_logprobs_TK.to(dtype), dim=-1)
    q_ref_TK = torch.log_softmax(ref_topk_logprobs_TK.to(dtype), dim=-1)
    kl_T = (q_theta_TK.exp() * (q_theta_TK - q_ref_TK)).sum(dim=-1)
    # Mathematically >= 0; rounding can leave -1e-8 when the two rows agree. Clamping keeps the guarantee exact
    # without changing the gradient anywhere the KL is not already zero.
    return kl_T.clamp(min=0.0)


def sampled_kl(logprobs_T: torch.Tensor, ref_logprobs_T: torch.Tensor, estimator: str) -> torch.Tensor:
    """(T,) Schulman's k1 / k2 / k3 estimate of KL(pi_theta || pi_ref) at tokens sampled from pi_theta."""
    lp, ref = logprobs_T.float(), ref_logprobs_T.float()
    if estimator == "k1":
        return lp - ref
    if estimator == "k2":
        return 0.5 * (lp - ref).square()
    if estimator == "k3":
        d = (ref - lp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (d.exp() - d - 1.0).clamp(max=_K3_MAX)
    raise ValueError(f"sampled KL estimator must be k1, k2 or k3, got {estimator!r}")


def reverse_cumsum_segments(x_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) out[t] = sum of x over positions t..end of t's segment (segments given by cu_seqlens (B+1,)).

    This is the undiscounted return-to-go: with per-token rewards r_t = -beta KL_t, the advantage of token t gains
    -beta * sum_{s >= t} KL_s, which is what `grpo_loss(token_adv=...)` adds to the group advantage.
    """
    if x_T.dim() != 1:
        raise ValueError(f"x must be flat (T,), got {tuple(x_T.shape)}")
    cu = cu_seqlens.long()
    if cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != x_T.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to T={x_T.shape[0]}, got {cu.tolist()[:8]}...")
    csum = torch.cat([x_T.new_zeros(1), torch.cumsum(x_T, 0)])  # csum[t] = sum x[:t]
    seq_T = torch.searchsorted(cu[1:], torch.arange(x_T.shape[0], device=x_T.device), right=True)
    end_T = cu[1:][seq_T]
    return csum[end_T] - csum[:-1]


def kl_penalty_token_adv(kl_T: torch.Tensor, cu_seqlens: torch.Tensor, beta: float) -> torch.Tensor:
    """token_adv for grpo_loss when the KL lives in the token-level reward: -beta * (return-to-go of KL_t)."""
    return -beta * reverse_cumsum_segments(kl_T.detach().float(), cu_seqlens)
