"""Pairwise preference losses: the reward model's Bradley–Terry + pointwise MSE loss, DPO (sigmoid, with label
smoothing = cDPO), IPO, and the reference-free SimPO and ORPO (over per-token mean log-probs).

Legend: P pairs, S sequences of a packed micro-batch (S = 2P, chosen and rejected interleaved: c0, r0, c1, r1, ...),
T packed tokens.

Every loss here returns the per-pair loss (P,). The stages turn it into the global-batch objective by summing with
the weight 1 / (pairs in the global batch), so gradients are the mean over pairs whatever the micro-batching and
data-parallel split (see nova_rt.trainer). `pair_stats` uses the same weight, so the trainer's sum of stats over
micro-batches and ranks is the global mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sequence_sums(values_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(S,) sums of `values_T` over each packed sequence [cu[i], cu[i+1]) (differentiable)."""
    lens_S = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_T = torch.repeat_interleave(torch.arange(len(lens_S), device=values_T.device), lens_S.to(values_T.device))
    return values_T.new_zeros(len(lens_S)).index_add(0, seq_T, values_T)


def bradley_terry_mse_loss(r_chosen_P: torch.Tensor, r_rejected_P: torch.Tensor, s_chosen_P: torch.Tensor,
                           s_rejected_P: torch.Tensor, has_score_P: torch.Tensor, alpha: float) -> torch.Tensor:
    """The Baichuan reward-model loss per pair (report Eq. 1):

        loss = -log σ(r_w - r_l) + α · 1[scored] · [(r_w - s_w)² + (r_l - s_l)²]

    r: predicted rewards of chosen (w) and rejected (l); s: absolute (normalised) scores, used only where
    `has_score_P` is true (pairs without scores get α = 0, as the report does for hh-rlhf/SHP; their s may be NaN).
    The pointwise term anchors the reward scale, which plain Bradley–Terry leaves free (the report's reason:
    BT fixes only the order of rewards, which invites reward hacking).
    """
    bt_P = -F.logsigmoid(r_chosen_P - r_rejected_P)
    if alpha == 0.0:
        return bt_P
    zero = torch.zeros_like(r_chosen_P)
    mse_P = (torch.where(has_score_P, r_chosen_P - s_chosen_P.to(r_chosen_P.dtype), zero) ** 2
             + torch.where(has_score_P, r_rejected_P - s_rejected_P.to(r_rejected_P.dtype), zero) ** 2)
    return bt_P + alpha * mse_P


def smoothed_logsigmoid_loss(logits_P: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1 - ε) · log σ(z) - ε · log σ(-z): the preference label flipped with probability ε (ε = 0: -log σ(z))."""
    loss_P = -F.logsigmoid(logits_P)
    if label_smoothing:
        loss_P = (1.0 - label_smoothing) * loss_P - label_smoothing * F.logsigmoid(-logits_P)
    return loss_P


def dpo_sigmoid_loss(h_P: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid DPO with conservative label smoothing ε (cDPO: the preference label is flipped with probability ε):

        loss = -(1 - ε) · log σ(β h) - ε · log σ(-β h),
        h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]   (sequence log-prob sums)
    """
    return smoothed_logsigmoid_loss(beta * h_P, label_smoothing)


def ipo_loss(h_P: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): loss = (h - 1 / (2β))², h as in DPO over sequence log-prob sums (the paper's form;
    TRL divides the log-probs by the completion length first). A squared loss regresses the log-ratio gap to a
    finite target instead of pushing it to infinity, which is IPO's fix for DPO overfitting deterministic pairs."""
    return (h_P - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(mean_chosen_P: torch.Tensor, mean_rejected_P: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), no reference model; m = log π(y|x) / |y|, the mean
    log-prob over the response tokens (the length normalisation):

        loss = -(1 - ε) · log σ(β (m_w - m_l) - γ) - ε · log σ(-(β (m_w - m_l) - γ))   (ε: as cDPO, TRL's CPO does)
    """
    return smoothed_logsigmoid_loss(beta * (mean_chosen_P - mean_rejected_P) - gamma, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - eˣ) for x < 0 without cancellation (log1p(-eˣ) below -log 2, log(-expm1 x) above)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(mean_chosen_P: torch.Tensor, mean_rejected_P: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 6-7), no reference model; m = mean response-token log-prob,
    p = eᵐ, odds = p / (1 - p), λ = β (TRL's ORPOTrainer convention):

        loss = -m_w - λ · log σ(log odds_w - log odds_l),   log odds = m - log(1 - eᵐ)

    -m_w is the paper's L_SFT (the chosen response's token-mean NLL). m is clamped to at most -ε (the dtype's
    machine epsilon) inside the odds only: at m = 0 (p = 1 in floating point) log(1 - p) is -inf and its gradient
    NaN; above the clamp the odds term has no gradient (the SFT term keeps its own)."""
    ceiling = -torch.finfo(mean_chosen_P.dtype).eps
    chosen_P, rejected_P = mean_chosen_P.clamp(max=ceiling), mean_rejected_P.clamp(max=ceiling)
    log_odds_P = (chosen_P - log1mexp(chosen_P)) - (rejected_P - log1mexp(rejected_P))
    return -mean_chosen_P - beta * F.logsigmoid(log_odds_P)


@dataclass(frozen=True)
class RewardLoss:
    """Per-pair reward-model loss; see `bradley_terry_mse_loss`."""

    alpha: float = 0.0

    def __call__(self, r_chosen_P, r_rejected_P, scores_P2, has_score_P) -> torch.Tensor:
        return bradley_terry_mse_loss(r_chosen_P, r_rejected_P, scores_P2[:, 0], scores_P2[:, 1], has_score_P,
                                      self.alpha)


REFERENCE_FREE = ("simpo", "orpo")
"""dpo.loss_type values that use no reference model (none is built, loaded or precomputed)."""


@dataclass(frozen=True)
class DPOLoss:
    """Per-pair preference loss and the rewards it implies for chosen and rejected: β·(log π - log π_ref) (sigmoid,
    ipo over sequence log-prob sums), β·(log π)/|y| (simpo, orpo: reference-free, over mean token log-probs, as
    TRL's CPO and ORPO trainers log them)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    """sigmoid (DPO; cDPO with label_smoothing > 0), ipo, simpo or orpo."""
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0
    """SimPO's target reward margin γ."""
    nll_weight: float = 0.0
    """simpo: weight of the chosen response's token-mean NLL added per pair (TRL's cpo_alpha; orpo's is 1)."""

    def __call__(self, policy_chosen_P, policy_rejected_P, ref_chosen_P=None, ref_rejected_P=None,
                 chosen_tokens_P=None, rejected_tokens_P=None):
        """-> (loss_P, reward_chosen_P, reward_rejected_P); rewards are detached (for logging). Log-probs are
        sequence sums (P,); simpo and orpo need the response token counts (P,) and no reference."""
        if self.loss_type in REFERENCE_FREE:
            mean_chosen_P = policy_chosen_P / chosen_tokens_P.to(policy_chosen_P.dtype)
            mean_rejected_P = policy_rejected_P / rejected_tokens_P.to(policy_rejected_P.dtype)
            if self.loss_type == "simpo":
                loss_P = simpo_loss(mean_chosen_P, mean_rejected_P, self.beta, self.simpo_gamma, self.label_smoothing)
                if self.nll_weight:
                    loss_P = loss_P - self.nll_weight * mean_chosen_P
            else:
                loss_P = orpo_loss(mean_chosen_P, mean_rejected_P, self.beta)
            return loss_P, self.beta * mean_chosen_P.detach(), self.beta * mean_rejected_P.detach()
        chosen_ratio_P = policy_chosen_P - ref_chosen_P.to(policy_chosen_P.dtype)
        rejected_ratio_P = policy_rejected_P - ref_rejected_P.to(policy_rejected_P.dtype)
        h_P = chosen_ratio_P - rejected_ratio_P
        if self.loss_type == "sigmoid":
            loss_P = dpo_sigmoid_loss(h_P, self.beta, self.label_smoothing)
        elif self.loss_type == "ipo":
            loss_P = ipo_loss(h_P, self.beta)
        else:
            raise ValueError(f"dpo.loss_type must be 'sigmoid', 'ipo', 'simpo' or 'orpo', got {self.loss_type!r}")
        return loss_P, self.beta * chosen_ratio_P.detach(), self.beta * rejected_ratio_P.detach()


def pair_stats(reward_chosen_P: torch.Tensor, reward_rejected_P: torch.Tensor, weight: float,
               prefix: str = "") -> dict[str, float]:
    """Weighted sums that add up to global means: rewards of chosen/rejected, margin, and accuracy
    (chosen reward above rejected; a tie counts one half, so an untrained DPO policy reads 0.5, not 0)."""
    rc, rr = reward_chosen_P.detach().double(), reward_rejected_P.detach().double()
    acc = (rc > rr).double() + 0.5 * (rc == rr).double()
    return {f"{prefix}reward_chosen": float(rc.sum()) * weight, f"{prefix}reward_rejected": float(rr.sum()) * weight,
            f"{prefix}margin": float((rc - rr).sum()) * weight, f"{prefix}accuracy": float(acc.sum()) * weight}
