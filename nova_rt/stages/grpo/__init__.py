"""Stage `grpo`: GRPO with rollouts from the current policy, verifiable / model / user rewards, and the Baichuan
report's KL (the exact top-k KL, in the token-level reward) with its PTX penalty on SFT data.

One rollout step: (every grpo.eval.every steps) a greedy per-category eval that re-weights the prompt sampler; draw
prompts and G samples each and score them (dynamic sampling redraws all-equal groups); pack, compute reference and
old log-probs; ppo_epochs x minibatches optimizer steps with grpo_loss (train.max_steps counts these); metrics,
checkpoint, exact resume. Formulas and options: docs/stages.md#grpo; the step drawn: docs/architecture.md.

Modules: config (the `grpo` section), batches (RolloutGroup, RolloutStats, the micro-batches RolloutBatch and
PTXBatch, packing and aggregation weights), losses (the GRPO and PTX objectives over a policy's outputs,
make_objective), run (GRPORun and the stage); every name is re-exported here. The stage runs on any policy backend
(parallel.backend); on megatron, rollouts run on an HF copy synced before each rollout.
"""

from nova_rt.stages.grpo.async_ import run  # registers the grpo stage
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
from nova_rt.stages.grpo.run import GRPORun, log

__all__ = ["AggregationTotals", "GRPOConfig", "GRPODataConfig", "GRPOEvalConfig", "GRPOLossConfig",
           "GRPORun", "PTXBatch", "PTXConfig", "PackedResponses", "PolicyLogprobs", "RolloutBatch", "RolloutGroup",
           "RolloutStats", "SamplingConfig", "_forward", "agg_scale_and_weights", "agg_totals", "log",
           "make_objective", "pack_responses", "ptx_loss_from_outputs", "rl_loss_from_outputs", "run"]
