"""grpo_loss's eager PyTorch path (the CPU path, and the only path of the sequence-level modes gspo and gmpo), its
input checks and mode tables. Per token, with x_t = clamp(lp_t - old_t, -20, 20), r_t = exp(x_t), a_t = A_i + tadv_t:

    ppo_clip    l_t = -min(r a, clip(r, 1 - eps_low, 1 + eps_high) a)                    (PPO / GRPO / DAPO)
    gspo        s_i = exp(clamp(mean_{t in i}(lp - old), -20, 20)), l_t = -min(s_i a, clip(s_i) a)  (2507.18071)
    gspo_token  the same value; s_i,t = sg[s_i] pi_t / sg[pi_t]: d l_t / d lp_t only (GSPO-token)
    cispo       l_t = -sg[clip(r, 1 - eps_low, 1 + eps_high)] a lp_t                       (2506.13585)
    sapo        l_t = -a (4 / tau) sigmoid(tau (r - 1)),  tau = tau_pos if a > 0 else tau_neg  (2511.20347)
    gmpo        l_i = -mean_t(a) exp(mean_t sgn(a) min(sgn(a) x, sgn(a) clamp(x, -eps_low, eps_high))),
                one term per response, weighted by seq-mean-token-mean only                 (2507.20673)

IS weights (`correction_weights`: rollout correction) scale l_t (gmpo: by their per-response geometric mean); the KL,
weights and stats are grpo_loss's. Full definitions and the peers' conventions: docs/algorithms.md.
"""

import torch

KL_MODES = {"k1": 1, "k2": 2, "k3": 3}
AGG_MODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum-norm": 2}
ADV_NORMS = ("std", "none")
LOSS_MODES = {"ppo_clip": 0, "cispo": 1, "sapo": 2, "gspo_token": 3, "gspo": 4, "gmpo": 5}
SEQUENCE_MODES = ("gspo", "gmpo")  # no Triton path: the gradient of a token depends on its whole response
MODE_AGGS = {"gmpo": ("seq-mean-token-mean",)}  # modes defined for some aggregations only
LOG_RATIO_CLAMP = 20.0
K3_MAX = 10.0
STD_EPS = 1e-4
STAT_NAMES = ("clip_frac", "kl_mean", "adv_mean", "adv_std", "ratio_mean")
CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop")


def segment_sum(v_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-response sums (B,) in float64 from a float64 prefix sum: deterministic (no atomics), differentiable."""
    prefix = torch.cat([v_T.new_zeros(1, dtype=torch.float64), v_T.double().cumsum(0)])
    cu = cu_seqlens.long()
    return prefix[cu[1:]] - prefix[cu[:-1]]


def seq_mean_log_ratio(logprobs, old_logprobs, cu_seqlens) -> torch.Tensor:
    """mean_{t in i}(lp_t - old_t) per response (B,) float64, 0 for an empty response (GSPO's log s_i, unclamped)."""
    cu = cu_seqlens.long()
    return segment_sum(logprobs.double() - old_logprobs.double(), cu) / (cu[1:] - cu[:-1]).clamp(min=1)


def correction_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cu_seqlens: torch.Tensor,
                       mode: str, cap: float = 3.0, low: float = 0.5, high: float = 5.0):
    """Rollout-correction weights per response token: (weights (T,) fp32, dropped (T,) bool), both detached.

    ratio = exp(old - rollout) per token, or exp(sum over the response of (old - rollout)) on each of its tokens
    (sequence_*); a NaN log-ratio (a token the engine could not score) counts as 0. truncate: min(ratio, cap);
    mask: ratio, 0 where ratio > cap; icepop: ratio, 0 outside [low, high]. TRL's vllm_importance_sampling_mode
    (clip_min None) and IcePop; `dropped` marks the zeroed tokens. No clamp on the log-ratio (TRL's neither):
    an overflow to inf is truncated to cap or dropped."""
    if mode not in CORRECTIONS[1:]:
        raise ValueError(f"correction must be one of {list(CORRECTIONS[1:])}, got {mode!r}")
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.dim() != 1:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} and rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} must have the same flat (T,) shape")
    if mode == "icepop" and not 0 <= low < high:
        raise ValueError(f"icepop needs 0 <= low < high, got low={low}, high={high}")
    if mode != "icepop" and not cap > 0:
        raise ValueError(f"correction cap must be > 0, got {cap}")
    log_ratio = torch.nan_to_num(old_logprobs.detach().float() - rollout_logprobs.detach().float(), nan=0.0)
    if mode.startswith("sequence"):
        cu = cu_seqlens.long()
        seq_T = torch.searchsorted(cu[1:], torch.arange(log_ratio.shape[0], device=cu.device), right=True)
        ratio = segment_sum(log_ratio, cu).exp().float()[seq_T]
    else:
        ratio = log_ratio.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap), torch.zeros_like(ratio, dtype=torch.bool)
    dropped = ratio > cap if mode != "icepop" else (ratio < low) | (ratio > high)
    return torch.where(dropped, 0.0, ratio), dropped


def _group_advantage_torch(rewards_B: torch.Tensor, group_size: int, adv_norm: str) -> torch.Tensor:
    r_BG = rewards_B.float().view(-1, group_size)
    d_BG = r_BG - r_BG[:, :1]  # against the first reward: equal rewards give exactly zero deviation
    dev_BG = d_BG - d_BG.mean(dim=1, keepdim=True)
    if adv_norm == "std":
        std = (dev_BG.square().sum(dim=1, keepdim=True) / max(group_size - 1, 1)).sqrt()
        dev_BG = dev_BG / (std + STD_EPS)
    return dev_BG.reshape(-1)


def _kl_torch(lp_T: torch.Tensor, ref_T: torch.Tensor, kl: str) -> torch.Tensor:
    if kl == "k1":
        return lp_T - ref_T
    if kl == "k2":
        return 0.5 * (lp_T - ref_T).square()
    d = (ref_T - lp_T).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (d.exp() - d - 1.0).clamp(max=K3_MAX)


def _agg_weights_torch(len_B: torch.Tensor, T: int, agg: str) -> torch.Tensor:
    B = len_B.numel()
    if agg == "token-mean":
        return torch.full((B,), 1.0 / max(T, 1), device=len_B.device)
    if agg == "seq-mean-token-mean":
        n_nonempty = (len_B > 0).sum().clamp(min=1)
        return torch.where(len_B > 0, 1.0 / (n_nonempty * len_B.clamp(min=1)), 0.0).float()
    return (1.0 / (B * len_B.max().clamp(min=1))).float().expand(B)


def _clipped_surrogate(a_T, ratio_T, eps_low, eps_high):
    pg1_T, pg2_T = -a_T * ratio_T, -a_T * ratio_T.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(pg1_T, pg2_T), pg2_T > pg1_T


def _token_surrogate(mode, a_T, lp_T, old_T, seq_T, cu, eps_low, eps_high, sapo_tau):
    """(l_t before the IS weight, clipped_t, the ratio of the stats) for the per-token modes and gspo."""
    clamp = LOG_RATIO_CLAMP
    if mode in ("gspo", "gspo_token"):
        log_s_B = seq_mean_log_ratio(lp_T, old_T, cu).float()
        if mode == "gspo_token":  # value sg[s_i], gradient d lp_t through pi_t / sg[pi_t]
            log_s_T = log_s_B.detach()[seq_T] + (lp_T - lp_T.detach())
        else:
            log_s_T = log_s_B[seq_T]
        ratio_T = log_s_T.clamp(-clamp, clamp).exp()
        loss_T, clipped_T = _clipped_surrogate(a_T, ratio_T, eps_low, eps_high)
        return loss_T, clipped_T, ratio_T
    ratio_T = (lp_T - old_T.float()).clamp(-clamp, clamp).exp()
    if mode == "cispo":
        kept_T = ratio_T.clamp(1.0 - eps_low, 1.0 + eps_high).detach()
        return -kept_T * a_T * lp_T, kept_T != ratio_T, ratio_T
    if mode == "sapo":
        tau_T = torch.where(a_T > 0, sapo_tau[0], sapo_tau[1])
        return -a_T * (4.0 / tau_T) * torch.sigmoid(tau_T * (ratio_T - 1.0)), torch.zeros_like(a_T, dtype=bool), \
            ratio_T
    loss_T, clipped_T = _clipped_surrogate(a_T, ratio_T, eps_low, eps_high)
    return loss_T, clipped_T, ratio_T


def _gmpo_terms(a_T, lp_T, old_T, cu, eps_low, eps_high, is_weights):
    """GMPO per response: (l_i (B,), clipped_t, the unclipped geometric-mean ratio per token)."""
    cu_long = cu.long()
    len_B = (cu_long[1:] - cu_long[:-1]).clamp(min=1)
    x_T = (lp_T - old_T.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    sign_T = torch.sign(a_T)
    chosen_T = torch.minimum(sign_T * x_T, sign_T * x_T.clamp(-eps_low, eps_high))
    clipped_T = chosen_T < sign_T * x_T
    ratio_B = (segment_sum(sign_T * chosen_T, cu) / len_B).exp()
    loss_B = -(segment_sum(a_T, cu) / len_B) * ratio_B
    if is_weights is not None:  # verl's geo_mean: the weights' geometric mean per response
        loss_B = loss_B * (segment_sum(torch.log(is_weights.detach().double() + 1e-10), cu) / len_B).exp()
    return loss_B.float(), clipped_T, (segment_sum(x_T, cu) / len_B).exp().float()


def grpo_loss_torch(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, *, eps_low=0.2,
                    eps_high=0.2, beta=0.0, kl="k3", agg="token-mean", adv_norm="std", token_adv=None,
                    is_weights=None, advantages=None, mode="ppo_clip", sapo_tau=(1.0, 1.05)):
    """Eager PyTorch path: the module docstring's math, fp32 compute (float64 response sums), autograd for the
    gradient. Arguments and returns as nova_rt.kernels.grpo_loss.grpo_loss."""
    check_inputs(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, beta, kl, agg, adv_norm,
                 token_adv, is_weights, advantages, mode, sapo_tau)
    T, dev = logprobs.shape[0], logprobs.device
    cu = cu_seqlens.long()
    seq_T = torch.searchsorted(cu[1:], torch.arange(T, device=dev), right=True)
    adv_B = advantages.detach().float() if advantages is not None else _group_advantage_torch(rewards, group_size,
                                                                                                adv_norm)
    a_T = adv_B[seq_T] + (token_adv.float() if token_adv is not None else 0.0)
    lp_T = logprobs.float()
    len_B = cu[1:] - cu[:-1]
    w_B = _agg_weights_torch(len_B, T, agg)
    if mode == "gmpo":
        seq_loss_B, clipped_T, ratio_B = _gmpo_terms(a_T, lp_T, old_logprobs, cu, eps_low, eps_high, is_weights)
        loss = (seq_loss_B * w_B * len_B).sum()  # sum_{t in i} w_t: each response's share of the aggregation
        ratio_T, loss_T = ratio_B[seq_T], torch.zeros_like(lp_T)
    else:
        loss_T, clipped_T, ratio_T = _token_surrogate(mode, a_T, lp_T, old_logprobs, seq_T, cu, eps_low, eps_high,
                                                      sapo_tau)
        if is_weights is not None:  # rollout correction: scales the surrogate only, as a constant
            loss_T = loss_T * is_weights.detach().float()
        loss = lp_T.new_zeros(())
    kl_T = _kl_torch(lp_T, ref_logprobs.float(), kl) if ref_logprobs is not None else torch.zeros_like(lp_T)
    if ref_logprobs is not None and beta != 0.0:
        loss_T = loss_T + beta * kl_T
    loss = loss + (loss_T * w_B[seq_T]).sum()
    inv_tokens = 1.0 / max(T, 1)
    stats = {
        "clip_frac": clipped_T.float().sum().detach() * inv_tokens,
        "kl_mean": kl_T.sum().detach() * inv_tokens,
        "adv_mean": adv_B.mean().detach(),
        "adv_std": adv_B.std(correction=0).detach(),
        "ratio_mean": ratio_T.sum().detach() * inv_tokens,
    }
    return loss, stats


def check_inputs(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, beta, kl, agg, adv_norm,
                 token_adv, is_weights=None, advantages=None, mode="ppo_clip", sapo_tau=(1.0, 1.05)) -> None:
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {sorted(KL_MODES)}, got {kl!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {sorted(AGG_MODES)}, got {agg!r}")
    if adv_norm not in ADV_NORMS:
        raise ValueError(f"adv_norm must be one of {ADV_NORMS}, got {adv_norm!r}")
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {list(LOSS_MODES)}, got {mode!r}")
    if agg not in MODE_AGGS.get(mode, AGG_MODES):
        raise ValueError(f"mode={mode!r} is defined for agg in {MODE_AGGS[mode]} only, got agg={agg!r}")
    if mode == "sapo" and not (len(sapo_tau) == 2 and all(t > 0 for t in sapo_tau)):
        raise ValueError(f"sapo_tau must be two temperatures (tau_pos, tau_neg) > 0, got {sapo_tau!r}")
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be flat (T,), got shape {tuple(logprobs.shape)}")
    T = logprobs.shape[0]
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("token_adv", token_adv),
                    ("is_weights", is_weights)):
        if x is not None and tuple(x.shape) != (T,):
            raise ValueError(f"{name} must have shape ({T},) like logprobs, got {tuple(x.shape)}")
        if x is not None and x.device != logprobs.device:
            raise ValueError(f"{name} is on {x.device}, logprobs on {logprobs.device}")
    if ref_logprobs is None and beta != 0.0:
        raise ValueError(f"ref_logprobs is None but beta={beta}: the KL term needs reference log-probs")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (B,) tensor, got shape {tuple(rewards.shape)}")
    B = rewards.numel()
    if not isinstance(group_size, int) or group_size < 1 or B % group_size != 0:
        raise ValueError(f"B={B} responses (rewards) must be a multiple of group_size={group_size} (a positive int)")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cu_seqlens.shape) != (B + 1,):
        raise ValueError(f"cu_seqlens must be int32/int64 of shape ({B + 1},) = B + 1, "
                         f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if advantages is not None and tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must have shape ({B},) like rewards, got {tuple(advantages.shape)}")
    for name, x in (("rewards", rewards), ("cu_seqlens", cu_seqlens), ("advantages", advantages)):
        if x is not None and x.device != logprobs.device:
            raise ValueError(f"{name} is on {x.device}, logprobs on {logprobs.device}")
    # Value checks need a host sync (and a graph break under torch.compile): CPU tensors in eager mode only.
    if not cu_seqlens.is_cuda and not torch.compiler.is_compiling():
        cu = cu_seqlens.long()
        if cu[0].item() != 0 or cu[-1].item() != T or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {cu.tolist()[:8]}...")
