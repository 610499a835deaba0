"""The `grpo` config section: a few top-level keys and eight sub-sections of at most 12 fields each.

  grpo.sampling  how rollouts are drawn: G, prompts per step, decoding, dynamic sampling
  grpo.data      where prompts come from: files, reasoning-gym tasks, eval sets, category weights, PAS model
  grpo.loss      the objective: clipping, aggregation, advantage normalisation, KL (weight, estimator, placement)
  grpo.ptx       the PTX penalty on SFT data
  grpo.eval      per-category greedy eval and the prompt re-weighting it drives
  grpo.rollout   the rollout engine (nova_rt.rollout.base.RolloutConfig)
  grpo.env       multi-turn episodes in an environment (nova_rt.envs.EnvConfig)
  grpo.async_rollout  dedicated rollout ranks and their staleness (nova_rt.rollout.base.AsyncRolloutConfig)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nova_rt.config import register_section
from nova_rt.config_values import check_range
from nova_rt.envs import EnvConfig
from nova_rt.losses.kl import KLEstimator
from nova_rt.rollout.base import AsyncRolloutConfig, RolloutConfig, check_generation
from nova_rt.stages.grpo.advantages import AdvantageEstimator


@dataclass(kw_only=True)
class SamplingConfig:
    group_size: int = 3
    """Samples per prompt (G); the report used 3."""
    prompts_per_step: int = 8
    """Prompts per rollout batch over all DP ranks (each gets group_size samples)."""
    max_new_tokens: int = 256
    """Longest response in tokens (generation stops there or at EOS)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest token set holding this probability mass; 1.0: all tokens."""
    top_k: int = 0
    """0 disables top-k sampling."""
    rollout_batch: int = 0
    """Sequences per generate call; 0: all at once."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and draw more prompts (DAPO's dynamic sampling)."""
    dynamic_max_rounds: int = 3
    """Most extra draws per step when dynamic sampling leaves too few groups."""

    def validate(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.sampling.group_size must be >= 2, got {self.group_size} (advantages are rewards "
                             "minus their group's mean: a group of one always has advantage 0 and trains nothing)")
        if self.prompts_per_step < 1:
            raise ValueError(f"grpo.sampling.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        check_range("grpo.sampling.max_new_tokens", self.max_new_tokens, ge=1)
        check_generation("grpo.sampling", self.temperature, self.top_p, self.top_k)
        check_range("grpo.sampling.rollout_batch", self.rollout_batch, ge=0)
        check_range("grpo.sampling.dynamic_max_rounds", self.dynamic_max_rounds, ge=0)


@dataclass(kw_only=True)
class GRPODataConfig:
    prompt_files: list[str] = field(default_factory=list)
    """RL prompts: rows with prompt|messages, answer, category, prefill (see nova_rt.data.rl)."""
    gym_tasks: list[dict] = field(default_factory=list)
    """reasoning-gym tasks: {name, size, seed, config, category, eval_size, prefill, template, weight}."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out prompts (prompt_files' rows) for the per-category greedy eval (grpo.eval)."""
    system_prompt: str = ""
    """System message added to prompts that have none."""
    category_weights: dict = field(default_factory=dict)
    """Base share of each category (missing: 1, or a gym task's `weight`)."""
    pas_model: str = ""
    """A PAS model directory: prompts are augmented with its complement before rollouts."""


@dataclass(kw_only=True)
class GRPOLossConfig:
    mode: Literal["ppo_clip", "gspo", "gspo_token", "cispo", "sapo", "gmpo"] = "ppo_clip"
    """Policy term: ppo_clip (PPO/GRPO/DAPO clipped surrogate), gspo (sequence-level ratio, arXiv 2507.18071),
    gspo_token (GSPO-token: same value, per-token gradient), cispo (stop-gradient IS weight clipped to [1 - eps_low,
    1 + eps_high] times log pi, eps_low 1 = no lower bound; arXiv 2506.13585), sapo (soft gate, sapo_tau; arXiv
    2511.20347) or gmpo (geometric mean of token ratios, log-ratios clipped to [-eps_low, eps_high]; arXiv
    2507.20673; seq-mean-token-mean only). Formulas and the peers' settings: docs/algorithms.md."""
    eps_low: float = 0.2
    """Lower clip: the ratio pi / pi_old is clipped to [1 - eps_low, 1 + eps_high] in the surrogate."""
    eps_high: float = 0.2
    """Upper clip; > eps_low is DAPO's clip-higher (e.g. 0.28)."""
    sapo_tau: list[float] = field(default_factory=lambda: [1.0, 1.05])
    """mode sapo: gate temperatures [tau_pos, tau_neg] for tokens with positive / non-positive advantage (TRL's
    sapo_temperature_pos / _neg)."""
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm."""
    adv_norm: Literal["std", "none"] = "std"
    """std (GRPO) or none (Dr.GRPO); used by advantage: group only."""
    advantage: AdvantageEstimator = "group"
    """Advantage estimator: group (GRPO: group mean, std per adv_norm), rloo (leave-one-out mean), reinforce_pp
    (REINFORCE++: rewards whitened over the step's tokens on all DP ranks) or reinforce_pp_baseline (group mean
    subtracted, then whitened); formulas: nova_rt.stages.grpo.advantages."""
    sum_norm_len: int = 0
    """L of seq-mean-token-sum-norm's per-token weight 1 / (B L): 0 = the rollout batch's longest response; Dr.GRPO,
    TRL's loss_type="dr_grpo" and verl use a constant, the generation budget (set it to max_new_tokens)."""
    beta: float = 0.0
    """KL weight; 0 needs no reference model (unless grpo.ptx.coef > 0)."""
    kl: KLEstimator = "topk"
    """KL estimator: topk (the report's exact KL over the reference's top-k ids), k1, k2 or k3."""
    kl_placement: Literal["reward", "loss"] = "reward"
    """reward (the report: per-token reward -beta KL_t, as return-to-go advantage) or loss (+beta KL in the loss)."""
    topk: int = 500
    """Reference top-k ids per token for the topk KL (capped at the vocabulary size)."""

    def validate(self) -> None:
        if self.mode == "gmpo" and self.agg != "seq-mean-token-mean":
            raise ValueError(f"grpo.loss.mode=gmpo is defined for grpo.loss.agg=seq-mean-token-mean only (one "
                             f"geometric mean per response), got grpo.loss.agg={self.agg}")
        if len(self.sapo_tau) != 2 or not all(tau > 0 for tau in self.sapo_tau):
            raise ValueError(f"grpo.loss.sapo_tau must be two temperatures [tau_pos, tau_neg] > 0, got "
                             f"{self.sapo_tau!r}")
        if self.sum_norm_len < 0:
            raise ValueError(f"grpo.loss.sum_norm_len must be >= 0, got {self.sum_norm_len}")
        if self.beta < 0:
            raise ValueError(f"grpo.loss.beta must be >= 0, got {self.beta}")
        if self.topk < 1:
            raise ValueError(f"grpo.loss.topk must be >= 1, got {self.topk}")


@dataclass(kw_only=True)
class PTXConfig:
    coef: float = 0.0
    """gamma of the PTX penalty (+gamma KL to the reference on SFT data); 0: off."""
    files: list[str] = field(default_factory=list)
    """SFT data (data.train_files' formats) for the PTX term; needed when coef > 0."""
    batch: int = 4
    """SFT rows per optimizer step for the PTX term (over all ranks)."""
    max_len: int = 1024
    """Longest PTX sample in tokens (longer ones are truncated)."""

    def validate(self) -> None:
        if self.coef < 0:
            raise ValueError(f"grpo.ptx.coef must be >= 0, got {self.coef}")


@dataclass(kw_only=True)
class GRPOEvalConfig:
    every: int = 0
    """Per-category greedy eval every N rollout steps (and at the end); 0: never."""
    batch: int = 32
    """Eval prompts per greedy generate call on each rank."""
    reweight: bool = True
    """Adjust category weights from each eval (the report's prompt re-weighting)."""
    reweight_max_ratio: float = 4.0
    """Each category's target is its base weight times a factor clipped to [1 / ratio, ratio] (>= 1)."""
    reweight_rate: float = 0.5
    """Step of each re-weighting, in (0, 1]: new weight = (1 - rate) * current + rate * target."""


@register_section("grpo")
@dataclass(kw_only=True)
class GRPOConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How rollouts are drawn: G, prompts per step, decoding, dynamic sampling."""
    data: GRPODataConfig = field(default_factory=GRPODataConfig)
    """Where prompts come from: files, reasoning-gym tasks, eval sets, category weights, PAS model."""
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    """The objective: clipping, aggregation, advantage normalisation, KL (weight, estimator, placement)."""
    ptx: PTXConfig = field(default_factory=PTXConfig)
    """The PTX penalty: KL to the reference on SFT data."""
    eval: GRPOEvalConfig = field(default_factory=GRPOEvalConfig)
    """Per-category greedy eval and the prompt re-weighting it drives."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine (hf decode loop | vllm) and its settings: nova_rt.rollout.base.RolloutConfig."""
    async_rollout: AsyncRolloutConfig = field(default_factory=AsyncRolloutConfig)
    """Dedicated rollout ranks that sample ahead of training by a bounded staleness (docs/async.md)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn episodes in an environment (nova_rt.envs; docs/multiturn.md); type empty: single-turn rollouts."""
    rewards: list[dict] = field(default_factory=lambda: [{"type": "math"}])
    """Reward sources and weights (nova_rt.rewards): math, format, reasoning_gym, reward_model, user."""
    ref_model: str = ""
    """Reference model path; empty: the initial policy (model.path)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch; > 1 keeps the rollout policy's log-probs as old_logprobs."""
    minibatches: int = 1
    """Optimizer steps per pass (the rollout batch's groups are split into this many parts)."""
    micro_prompts: int = 0
    """Groups per micro-batch (forward/backward); 0: all of a rank's groups at once."""
    shared_prefix: bool = True
    """Training forwards put each prompt once in front of its G responses (which attend to it but not to each
    other) instead of repeating it G times; same log-probs and gradients, fewer tokens. Used where the model runs
    nova_rt's attention (model.attn_impl auto/nova, parallel.backend hf); other setups repeat the prompt."""

    def validate(self) -> None:
        """Checks across sub-sections (each sub-section checks its own fields when it is read)."""
        checks = [(self.ppo_epochs >= 1, f"grpo.ppo_epochs must be >= 1, got {self.ppo_epochs}"),
                  (self.minibatches >= 1, f"grpo.minibatches must be >= 1, got {self.minibatches}"),
                  (self.ptx.coef == 0 or self.ptx.files, "grpo.ptx.coef > 0 needs grpo.ptx.files"),
                  (self.data.prompt_files or self.data.gym_tasks, "give grpo.data.prompt_files or grpo.data.gym_tasks")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.minibatches > self.sampling.prompts_per_step:
            raise ValueError(f"grpo.minibatches={self.minibatches} exceeds "
                             f"grpo.sampling.prompts_per_step={self.sampling.prompts_per_step}")
        s, r = self.sampling, self.rollout
        if r.engine == "vllm" and s.temperature != 1.0 and (s.top_k > 0 or s.top_p < 1.0):
            raise ValueError(f"grpo.sampling.temperature={s.temperature} with top_k={s.top_k} / top_p={s.top_p} is "
                             "not supported by grpo.rollout.engine=vllm (it returns log-probs after top-k/top-p "
                             "filtering, not the tempered ones): use temperature 1 or top_k 0 and top_p 1")
        if r.max_model_len and s.max_new_tokens >= r.max_model_len:
            raise ValueError(f"grpo.sampling.max_new_tokens={s.max_new_tokens} leaves no room for the prompt in "
                             f"grpo.rollout.max_model_len={r.max_model_len}")
        if self.eval.every > 0 and not self.data.eval_files and not any(
                isinstance(t, dict) and t.get("eval_size", 50) != 0 for t in self.data.gym_tasks):
            raise ValueError(f"grpo.eval.every={self.eval.every} needs eval prompts: give grpo.data.eval_files (or a "
                             "grpo.data.gym_tasks entry with eval_size > 0), or set grpo.eval.every: 0")
        check_range("grpo.eval.batch", self.eval.batch, ge=1)
        self.env.validate()
        if self.env.enabled:
            if r.engine == "vllm" and r.max_model_len and self.env.max_total_tokens > r.max_model_len:
                raise ValueError(f"grpo.env.max_total_tokens={self.env.max_total_tokens} exceeds "
                                 f"grpo.rollout.max_model_len={r.max_model_len} (vLLM's longest sequence): lower "
                                 "the first or raise the second")
            if self.data.pas_model:
                raise ValueError(f"grpo.env.type={self.env.type} with grpo.data.pas_model: an environment's reset() "
                                 "opens the conversation, PAS would not see it; drop one of them")
            if any(isinstance(task, dict) and task.get("prefill") for task in self.data.gym_tasks):
                raise ValueError(f"grpo.env.type={self.env.type}: grpo.data.gym_tasks entries must not set prefill "
                                 "(the environment opens the conversation)")

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.minibatches

    @property
    def needs_ref(self) -> bool:
        return self.loss.beta > 0 or self.ptx.coef > 0
