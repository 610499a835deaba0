"""GRPO with rollouts from the current policy, verifiable / model / user rewards, and the Baichuan report's KL.

One step (train.max_steps counts optimizer steps; each rollout batch gives ppo_epochs x minibatches of them):
  1. (every grpo.eval.every rollout steps) greedy per-category eval -> metrics, and the sampler's category weights are
     re-weighted from it (nova_rt.data.rl.reweight);
  2. draw grpo.sampling.prompts_per_step prompts (category-weighted), G samples each (nova_rt.rollout.generate),
     score them;
     dynamic sampling drops groups whose rewards are all equal (no signal) and draws again, up to a bound;
  3. pack prompt+response per sample (loss only on response tokens), compute reference top-k / log-probs and, when
     a rollout batch is used for several optimizer steps, the rollout policy's log-probs (kept as old_logprobs);
  4. optimizer steps with grpo_loss. KL to the reference (beta): estimator k1/k2/k3 or "topk" (the report's exact
     KL over the reference's top-k ids, nova_rt.losses.kl), placed in the loss or, as the report does, in the
     token-level reward: r_t = -beta KL_t, whose return-to-go -beta sum_{s>=t} KL_s is passed to grpo_loss as
     token_adv (KL_t from the rollout policy, no gradient), on top of the group advantage of the sequence reward;
  5. PTX (grpo.ptx.coef = gamma > 0): + gamma * mean_t KL_topk(pi_theta || pi_ref) over the supervised tokens of a
     batch of SFT rows, a penalty that keeps the policy near the reference on SFT data (the report's Eq. 2 term);
  6. metrics.jsonl, checkpoint (extra state: sampler, rollout RNG, category weights), exact resume.

Normalisation: grpo_loss normalises within its call; each micro-batch's loss is rescaled so the sum over
micro-batches and DP ranks equals the chosen aggregation over the whole rollout batch (token-mean: 1/T_total;
seq-mean-token-mean: 1/(responses_total L_i); seq-mean-token-sum-norm: 1/(B_total L_max,total)). Micro-batches hold
whole groups, so group advantages are exact.

Modules: config (the `grpo` section and its sub-sections), batches (the typed data: RolloutGroup, RolloutStats, the
micro-batches RolloutBatch / PTXBatch, packing and aggregation weights), losses (the GRPO and PTX objectives
over a policy backend's outputs, make_objective), run (GRPORun and the stage). Every name is re-exported
here. The stage runs on any policy backend (parallel.backend, nova_rt.backends, head="policy"): on megatron the
policy, reference and old log-probs come from megatron-core while rollouts run on an HF copy synced before each
rollout (nova_rt.backends.megatron.MegatronPolicy).
"""

from nova_rt.stages.grpo.batches import (
    AggregationTotals,
    PackedResponses,
    PolicyLogprobs,
    PTXBatch,
    RolloutBatch,
    RolloutGroup,
    RolloutStats,
    _forward,
    agg_scale_and_weights,
    agg_totals,
    pack_responses,
)
from nova_rt.stages.grpo.config import (
    GRPOConfig,
    GRPODataConfig,
    GRPOEvalConfig,
    GRPOLossConfig,
    PTXConfig,
    SamplingConfig,
)
from nova_rt.stages.grpo.losses import (
    make_objective,
    ptx_loss_from_outputs,
    rl_loss_from_outputs,
)
from nova_rt.stages.grpo.run import GRPORun, log, run

__all__ = ["AggregationTotals", "GRPOConfig", "GRPODataConfig", "GRPOEvalConfig", "GRPOLossConfig",
           "GRPORun", "PTXBatch", "PTXConfig", "PackedResponses", "PolicyLogprobs", "RolloutBatch", "RolloutGroup",
           "RolloutStats", "SamplingConfig", "_forward", "agg_scale_and_weights", "agg_totals", "log",
           "make_objective", "pack_responses", "ptx_loss_from_outputs", "rl_loss_from_outputs", "run"]
