"""GRPO losses on one micro-batch: grpo_loss with the KL in the reward or the loss, and the PTX penalty."""

from __future__ import annotations

from nova_rt.kernels.grpo_loss import grpo_loss, tis_weights
from nova_rt.losses.kl import kl_penalty_token_adv, sampled_kl, topk_kl
from nova_rt.stages.grpo.batches import _forward
from nova_rt.stages.grpo.config import GRPOConfig


def rl_loss(model, mb: dict, g: GRPOConfig, temperature: float):
    """grpo_loss on one micro-batch of whole groups, KL in the reward or the loss, globally normalised."""
    topk = g.loss.kl == "topk" and "ref_topk_ids" in mb
    out = _forward(model, mb, temperature=temperature, return_entropy=True,
                   topk_ids=mb["ref_topk_ids"] if topk else None)
    return rl_loss_from_outputs(out, mb, g)


def rl_loss_from_outputs(out: dict, mb: dict, g: GRPOConfig):
    """rl_loss given the policy's outputs on the response tokens: logprobs, entropy (and topk_logprobs)."""
    topk = g.loss.kl == "topk" and "ref_topk_ids" in mb
    lp = out["logprobs"]
    old = mb["old_lp"] if "old_lp" in mb else lp.detach()
    kl_T = None
    if topk:
        kl_T = topk_kl(out["topk_logprobs"], mb["ref_topk_lp"])
    elif "ref_lp" in mb:
        kl_T = sampled_kl(lp, mb["ref_lp"], g.loss.kl)
    in_reward = g.loss.beta > 0 and g.loss.kl_placement == "reward"
    sampled_in_loss = g.loss.beta > 0 and g.loss.kl_placement == "loss" and not topk
    token_adv = None
    if in_reward:  # KL_t of the rollout policy: precomputed when the batch serves several steps
        token_adv = kl_penalty_token_adv(mb["old_kl"] if "old_kl" in mb else kl_T.detach(), mb["resp_cu"], g.loss.beta)
    # TIS (grpo.rollout.tis_cap): min(exp(log p_old - log p_rollout), cap) on the surrogate. log p_old is the
    # rollout-time policy: the precomputed old_lp when the batch serves several steps, else this forward's (detached).
    is_w = tis_weights(old, mb["rollout_lp"], g.rollout.tis_cap) if "rollout_lp" in mb else None
    loss, st = grpo_loss(lp, old, mb["ref_lp"] if sampled_in_loss else None, mb["rewards"], mb["resp_cu"],
                         g.sampling.group_size, eps_low=g.loss.eps_low, eps_high=g.loss.eps_high,
                         beta=g.loss.beta if sampled_in_loss else 0.0, kl=g.loss.kl if sampled_in_loss else "k3",
                         agg=g.loss.agg, adv_norm=g.loss.adv_norm, token_adv=token_adv, is_weights=is_w)
    loss = loss * mb["agg_scale"]
    if g.loss.beta > 0 and g.loss.kl_placement == "loss" and topk:
        loss = loss + g.loss.beta * (kl_T * mb["tok_w"]).sum()
    n = float(lp.shape[0])
    stats = {"resp_tokens": n, "clip_tokens": st["clip_frac"] * n, "entropy_sum": out["entropy"].detach().sum(),
             "ratio_sum": st["ratio_mean"] * n}
    if kl_T is not None:
        stats["kl_sum"] = kl_T.detach().sum()
    if is_w is not None:
        stats["tis_w_sum"] = is_w.sum()
    return loss, stats


def ptx_loss(model, mb: dict, g: GRPOConfig):
    """gamma * sum_t w_t KL_topk(pi_theta || pi_ref)_t over SFT supervised tokens, w_t = 1 / (tokens, global)."""
    return ptx_loss_from_outputs(_forward(model, mb, topk_ids=mb["ref_topk_ids"]), mb, g)


def ptx_loss_from_outputs(out: dict, mb: dict, g: GRPOConfig):
    """ptx_loss given the policy's top-k log-probs (temperature 1) at the reference's ids of the supervised tokens."""
    kl_T = topk_kl(out["topk_logprobs"], mb["ref_topk_lp"])
    return g.ptx.coef * (kl_T * mb["w"]).sum(), {"ptx_kl_sum": kl_T.detach().sum(),
                                                 "ptx_tokens": float(kl_T.shape[0])}


def make_objective(g: GRPOConfig):
    """The stage's objective over the policy backend's outputs at the target tokens (nova_rt.backends.base): the PTX
    penalty on PTX rows, rl_loss on rollout rows."""
    def objective(out: dict, mb: dict):
        return ptx_loss_from_outputs(out, mb, g) if mb["kind"] == "ptx" else rl_loss_from_outputs(out, mb, g)

    return objective


def make_loss_fn(g: GRPOConfig, temperature: float):
    def loss_fn(model, mb):
        return ptx_loss(model, mb, g) if mb["kind"] == "ptx" else rl_loss(model, mb, g, temperature)

    return loss_fn
