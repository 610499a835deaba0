"""The GRPO losses as `loss_fn(model, micro_batch)` over a model's own forward (the HF Trainer's interface): the
stage runs the same objectives through its policy backend (nova_rt.stages.grpo.losses.make_objective); the tests use
these to check them against oracles on a plain module."""

from __future__ import annotations

from nova_rt.stages.grpo import (
    GRPOConfig,
    PTXBatch,
    RolloutBatch,
    _forward,
    ptx_loss_from_outputs,
    rl_loss_from_outputs,
)


def rl_loss(model, mb: RolloutBatch, grpo: GRPOConfig, temperature: float):
    """grpo_loss on one micro-batch of whole groups, KL in the reward or the loss, globally normalised."""
    topk = grpo.loss.kl == "topk" and mb.ref_topk_ids is not None
    outputs = _forward(model, mb, temperature=temperature, return_entropy=True,
                       topk_ids=mb.ref_topk_ids if topk else None)
    return rl_loss_from_outputs(outputs, mb, grpo)


def ptx_loss(model, mb: PTXBatch, grpo: GRPOConfig):
    """gamma * sum_t w_t KL_topk(pi_theta || pi_ref)_t over SFT supervised tokens, w_t = 1 / (tokens, global)."""
    return ptx_loss_from_outputs(_forward(model, mb, topk_ids=mb.ref_topk_ids), mb, grpo)


def make_loss_fn(grpo: GRPOConfig, temperature: float):
    def loss_fn(model, mb: RolloutBatch | PTXBatch):
        return ptx_loss(model, mb, grpo) if isinstance(mb, PTXBatch) else rl_loss(model, mb, grpo, temperature)

    return loss_fn
