"""GRPO losses on one micro-batch: grpo_loss with the KL in the reward or the loss, and the PTX penalty."""

from __future__ import annotations

from nova_rt.errors import ConfigError
from nova_rt.kernels.grpo_loss import correction_weights, grpo_loss
from nova_rt.losses.kl import kl_penalty_token_adv, sampled_kl, topk_kl
from nova_rt.stages.grpo.batches import PTXBatch, RolloutBatch, RolloutGroup
from nova_rt.stages.grpo.config import GRPOConfig


def behaviour_logprobs(groups: list[RolloutGroup], correction: str) -> list[float]:
    """The engine's sampling log-probs of the groups' target tokens, flat in response-token order; a ConfigError
    naming grpo.rollout.correction when a response has none (the correction needs them)."""
    flat: list[float] = []
    for group in groups:
        lengths = group.target_lengths()
        given = group.rollout_logprobs or [[] for _ in lengths]
        if [len(logprobs) for logprobs in given] != lengths:
            raise ConfigError(f"grpo.rollout.correction={correction}: the rollout engine gave no sampling log-probs "
                              f"for some response tokens ({sum(map(len, given))} for {sum(lengths)} tokens); "
                              "the correction needs them: set grpo.rollout.correction: none")
        flat += [x for logprobs in given for x in logprobs]
    return flat


def rl_loss_from_outputs(outputs: dict, mb: RolloutBatch, grpo: GRPOConfig):
    """grpo_loss on one micro-batch of whole groups (KL in the reward or the loss, globally normalised), given the
    policy's outputs on the response tokens: logprobs, entropy (and topk_logprobs)."""
    loss_cfg = grpo.loss
    topk = loss_cfg.kl == "topk" and mb.ref_topk_ids is not None
    logprobs = outputs["logprobs"]
    old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
    kl_T = None
    if topk:
        kl_T = topk_kl(outputs["topk_logprobs"], mb.ref_topk_logprobs)
    elif mb.ref_logprobs is not None:
        kl_T = sampled_kl(logprobs, mb.ref_logprobs, loss_cfg.kl)
    in_reward = loss_cfg.beta > 0 and loss_cfg.kl_placement == "reward"
    sampled_in_loss = loss_cfg.beta > 0 and loss_cfg.kl_placement == "loss" and not topk
    token_adv = None
    if in_reward:  # KL_t of the rollout policy: precomputed when the batch serves several steps
        token_adv = kl_penalty_token_adv(mb.old_kl if mb.old_kl is not None else kl_T.detach(),
                                         mb.response_cu_seqlens, loss_cfg.beta)
    # grpo.rollout.correction: IS weights from pi_old / pi_rollout on the surrogate. log p_old is the rollout-time
    # policy: the precomputed old_logprobs when the batch serves several steps, else this forward's (detached).
    is_weights = dropped = None
    rollout = grpo.rollout
    if rollout.correction != "none" and mb.rollout_logprobs is not None:
        is_weights, dropped = correction_weights(old, mb.rollout_logprobs.to(old.device), mb.response_cu_seqlens,
                                                 rollout.correction, rollout.correction_cap, rollout.correction_low,
                                                 rollout.correction_high)
    loss, loss_stats = grpo_loss(
        logprobs, old, mb.ref_logprobs if sampled_in_loss else None, mb.rewards, mb.response_cu_seqlens,
        grpo.sampling.group_size, eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high,
        beta=loss_cfg.beta if sampled_in_loss else 0.0, kl=loss_cfg.kl if sampled_in_loss else "k3",
        agg=loss_cfg.agg, adv_norm=loss_cfg.adv_norm, token_adv=token_adv, is_weights=is_weights,
        advantages=mb.advantages, mode=loss_cfg.mode, sapo_tau=tuple(loss_cfg.sapo_tau))
    loss = loss * mb.agg_scale
    if loss_cfg.beta > 0 and loss_cfg.kl_placement == "loss" and topk:
        loss = loss + loss_cfg.beta * (kl_T * mb.token_weights).sum()
    tokens = float(logprobs.shape[0])
    stats = {"resp_tokens": tokens, "clip_tokens": loss_stats["clip_frac"] * tokens,
             "entropy_sum": outputs["entropy"].detach().sum(), "ratio_sum": loss_stats["ratio_mean"] * tokens}
    if kl_T is not None:
        stats["kl_sum"] = kl_T.detach().sum()
    if is_weights is not None:
        stats["is_w_sum"] = is_weights.sum()
        stats["is_dropped"] = dropped.sum().float()
    return loss, stats


def ptx_loss_from_outputs(outputs: dict, mb: PTXBatch, grpo: GRPOConfig):
    """gamma * sum_t w_t KL_topk(pi_theta || pi_ref)_t over SFT supervised tokens (w_t = 1 / tokens, global), given
    the policy's top-k log-probs (temperature 1) at the reference's ids."""
    kl_T = topk_kl(outputs["topk_logprobs"], mb.ref_topk_logprobs)
    return grpo.ptx.coef * (kl_T * mb.token_weights).sum(), {"ptx_kl_sum": kl_T.detach().sum(),
                                                             "ptx_tokens": float(kl_T.shape[0])}


def make_objective(grpo: GRPOConfig):
    """The stage's objective over the policy backend's outputs at the target tokens (nova_rt.backends.base): the PTX
    penalty on PTX rows, the GRPO loss on rollout rows."""
    def objective(outputs: dict, mb: RolloutBatch | PTXBatch):
        if isinstance(mb, PTXBatch):
            return ptx_loss_from_outputs(outputs, mb, grpo)
        return rl_loss_from_outputs(outputs, mb, grpo)

    return objective
