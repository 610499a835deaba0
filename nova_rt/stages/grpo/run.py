"""GRPO with rollouts from the current policy, verifiable / model / user rewards, and the Baichuan report's KL.

One step (train.max_steps counts optimizer steps; each rollout batch gives ppo_epochs x minibatches of them):
  1. (every eval_every rollout steps) greedy per-category eval -> metrics, and the sampler's category weights are
     re-weighted from it (nova_rt.data.rl.reweight);
  2. draw prompts_per_step prompts (category-weighted), G samples each (nova_rt.rollout.generate), score them;
     dynamic sampling drops groups whose rewards are all equal (no signal) and draws again, up to a bound;
  3. pack prompt+response per sample (loss only on response tokens), compute reference top-k / log-probs and, when
     a rollout batch is used for several optimizer steps, the rollout policy's log-probs (kept as old_logprobs);
  4. optimizer steps with grpo_loss. KL to the reference (beta): estimator k1/k2/k3 or "topk" (the report's exact
     KL over the reference's top-k ids, nova_rt.losses.kl), placed in the loss or, as the report does, in the
     token-level reward: r_t = -beta KL_t, whose return-to-go -beta sum_{s>=t} KL_s is passed to grpo_loss as
     token_adv (KL_t from the rollout policy, no gradient), on top of the group advantage of the sequence reward;
  5. PTX (ptx_coef = gamma > 0): + gamma * mean_t KL_topk(pi_theta || pi_ref) over the supervised tokens of a
     batch of SFT rows, a penalty that keeps the policy near the reference on SFT data (the report's Eq. 2 term);
  6. metrics.jsonl, checkpoint (extra state: sampler, rollout RNG, category weights), exact resume.

Normalisation: grpo_loss normalises within its call; each micro-batch's loss is rescaled so the sum over
micro-batches and DP ranks equals the chosen aggregation over the whole rollout batch (token-mean: 1/T_total;
seq-mean-token-mean: 1/(responses_total L_i); seq-mean-token-sum-norm: 1/(B_total L_max,total)). Micro-batches hold
whole groups, so group advantages are exact.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from nova_rt.config import Config, register_section
from nova_rt.data.chat import IGNORE, Sample
from nova_rt.data.packing import collate, epoch_permutation, make_row
from nova_rt.data.rl import (
    CategorySampler,
    PromptEncoder,
    build_prompt_sets,
    evaluate_categories,
    normalise_weights,
    reweight,
)
from nova_rt.distributed import all_reduce_sum
from nova_rt.kernels.grpo_loss import grpo_loss
from nova_rt.losses.kl import KLEstimator, kl_penalty_token_adv, sampled_kl, topk_kl
from nova_rt.models.attention import SharedPrefixLayout, supports_shared_prefix
from nova_rt.models.causal import CausalLMLogprobs
from nova_rt.rollout.base import RolloutConfig
from nova_rt.stages import register_stage
from nova_rt.stages.common import data_files, load_policy, save_final_policy, setup
from nova_rt.telemetry import Telemetry
from nova_rt.trainer import Trainer

log = logging.getLogger("nova_rt.grpo")


@register_section("grpo")
@dataclass(kw_only=True)
class GRPOConfig:
    group_size: int = 3
    """Samples per prompt (G); the report used 3."""
    prompts_per_step: int = 8
    """Prompts per rollout batch over all DP ranks (each gets group_size samples)."""
    micro_prompts: int = 0
    """Groups per micro-batch (forward/backward); 0: all of a rank's groups at once."""
    shared_prefix: bool = True
    """Training forwards put each prompt once in front of its G responses (which attend to it but not to each
    other) instead of repeating it G times; same log-probs and gradients, fewer tokens. Used where the model runs
    nova_rt's attention (model.attn_impl auto/nova, parallel.backend hf); other setups repeat the prompt."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    """Sampling temperature; log-probs for the loss use the same temperature."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k sampling."""
    rollout_batch: int = 0
    """Sequences per generate call; 0: all at once."""
    prompt_files: list[str] = field(default_factory=list)
    """RL prompts: rows with prompt|messages, answer, category, prefill (see nova_rt.data.rl)."""
    gym_tasks: list[dict] = field(default_factory=list)
    """reasoning-gym tasks: {name, size, seed, config, category, eval_size, prefill, template, weight}."""
    eval_files: list[str] = field(default_factory=list)
    system_prompt: str = ""
    """System message added to prompts that have none."""
    category_weights: dict = field(default_factory=dict)
    """Base share of each category (missing: 1, or a gym task's `weight`)."""
    rewards: list[dict] = field(default_factory=lambda: [{"type": "math"}])
    """Reward sources and weights (nova_rt.rewards): math, format, reasoning_gym, reward_model, user."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    """Upper clip; > eps_low is DAPO's clip-higher (e.g. 0.28)."""
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm."""
    adv_norm: Literal["std", "none"] = "std"
    """std (GRPO) or none (Dr.GRPO)."""
    sum_norm_len: int = 0
    """L of seq-mean-token-sum-norm's per-token weight 1 / (B L): 0 = the rollout batch's longest response; Dr.GRPO,
    TRL's loss_type="dr_grpo" and verl use a constant, the generation budget (set it to max_new_tokens)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch; > 1 keeps the rollout policy's log-probs as old_logprobs."""
    minibatches: int = 1
    """Optimizer steps per pass (the rollout batch's groups are split into this many parts)."""
    beta: float = 0.0
    """KL weight; 0 needs no reference model (unless ptx_coef > 0)."""
    kl: KLEstimator = "topk"
    """KL estimator: topk (the report's exact KL over the reference's top-k ids), k1, k2 or k3."""
    kl_placement: Literal["reward", "loss"] = "reward"
    """reward (the report: per-token reward -beta KL_t, as return-to-go advantage) or loss (+beta KL in the loss)."""
    topk: int = 500
    """Reference top-k ids per token for the topk KL (capped at the vocabulary size)."""
    ptx_coef: float = 0.0
    """gamma of the PTX penalty (+gamma KL to the reference on SFT data)."""
    ptx_files: list[str] = field(default_factory=list)
    ptx_batch: int = 4
    """SFT rows per optimizer step for the PTX term (over all ranks)."""
    ptx_max_len: int = 1024
    ref_model: str = ""
    """Reference model path; empty: the initial policy (model.path)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and draw more prompts (DAPO's dynamic sampling)."""
    dynamic_max_rounds: int = 3
    """Most extra draws per step when dynamic sampling leaves too few groups."""
    eval_every: int = 0
    """Per-category greedy eval every N rollout steps (and at the end); 0: never."""
    eval_batch: int = 32
    reweight: bool = True
    """Adjust category weights from each eval (the report's prompt re-weighting)."""
    reweight_max_ratio: float = 4.0
    reweight_rate: float = 0.5
    pas_model: str = ""
    """A PAS model directory: prompts are augmented with its complement before rollouts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine (hf decode loop | vllm) and its settings: nova_rt.rollout.base.RolloutConfig."""

    def validate(self) -> None:
        checks = [(self.group_size >= 2, f"group_size must be >= 2, got {self.group_size} (advantages are rewards "
                   "minus their group's mean: a group of one always has advantage 0 and trains nothing)"),
                  (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
                  (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.sum_norm_len >= 0, "sum_norm_len must be >= 0"),
                  (self.ppo_epochs >= 1 and self.minibatches >= 1, "ppo_epochs and minibatches must be >= 1"),
                  (self.beta >= 0 and self.ptx_coef >= 0, "beta and ptx_coef must be >= 0"),
                  (self.ptx_coef == 0 or self.ptx_files, "ptx_coef > 0 needs ptx_files"),
                  (self.topk >= 1, "topk must be >= 1"),
                  (self.prompt_files or self.gym_tasks, "give prompt_files or gym_tasks")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.minibatches > self.prompts_per_step:
            raise ValueError(f"minibatches={self.minibatches} exceeds prompts_per_step={self.prompts_per_step}")

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.minibatches

    @property
    def needs_ref(self) -> bool:
        return self.beta > 0 or self.ptx_coef > 0


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


def _forward(model, mb: dict, **kw) -> dict:
    if mb.get("shared_prefix") is not None:
        kw["shared_prefix"] = mb["shared_prefix"]
    return model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"], mb["targets"], **kw)


# ----------------------------------------------------------------------------------------------- batches
def pack_responses(prompts: list[list[int]], responses: list[list[int]], shared_prefix: bool = False) -> dict:
    """One flat micro-batch of prompt+response sequences; targets only on response tokens. Adds resp_cu (B+1,).

    shared_prefix: adjacent responses to the same prompt form a group laid out as [prompt[:-1]] then, per non-empty
    response r, [prompt[-1]] + r[:-1] at positions len(prompt)-1 ...; each response segment attends to the prompt
    part and causally to itself (SharedPrefixLayout), so every target token sees exactly the context it has in its
    own prompt+response sequence. The last prompt token is repeated per response because its hidden state predicts
    each response's first token. cu_seqlens then marks the groups."""
    resp_cu = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in responses])]), dtype=torch.int64)
    if not shared_prefix:
        samples = []
        for p, r in zip(prompts, responses):
            ids = np.asarray((p + r)[:-1] if r else p, dtype=np.int64)  # the last token is never an input
            tg = np.asarray([IGNORE] * (len(p) - 1) + r if r else [IGNORE] * len(p), dtype=np.int64)
            samples.append(Sample(ids, tg))
        mb = collate([make_row(samples)])
        mb["resp_cu"] = resp_cu
        return mb
    ids, tgs, pos, groups = [], [], [], []
    i = 0
    while i < len(prompts):
        p, j = prompts[i], i
        while j < len(prompts) and prompts[j] == p:
            j += 1
        if not p:
            raise ValueError("pack_responses: empty prompt")
        a = len(p) - 1
        ids.append(p[:-1]), tgs.append([IGNORE] * a), pos.append(list(range(a)))
        segs = []
        for r in responses[i:j]:
            if r:
                ids.append([p[-1]] + r[:-1]), tgs.append(r), pos.append(list(range(a, a + len(r))))
                segs.append(len(r))
        groups.append((a, segs))
        i = j
    flat = lambda xs: torch.tensor([x for part in xs for x in part], dtype=torch.int64)  # noqa: E731
    cu = torch.tensor(np.concatenate([[0], np.cumsum([a + sum(segs) for a, segs in groups])]), dtype=torch.int32)
    return {"input_ids": flat(ids).unsqueeze(0), "targets": flat(tgs), "position_ids": flat(pos).unsqueeze(0),
            "cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max()), "resp_cu": resp_cu,
            "shared_prefix": SharedPrefixLayout.build(groups)}


def agg_totals(lens: list[int], group=None) -> torch.Tensor:
    """[tokens, non-empty responses, responses, longest] of this rank's part; summed / maxed over the ranks of
    `group` (default: all; the megatron backend passes its data-parallel group)."""
    t = torch.tensor([float(sum(lens)), float(sum(x > 0 for x in lens)), float(len(lens))], dtype=torch.float64)
    longest = torch.tensor([float(max(lens, default=0))], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, group=group)
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX, group=group)
    return torch.cat([t, longest])


def agg_scale_and_weights(agg: str, lens: list[int], totals: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(factor turning grpo_loss's within-call aggregation into the global one, global per-token weights)."""
    T, n_ne, B, lmax = (max(float(x), 1.0) for x in totals.tolist())
    len_t = torch.tensor(lens, dtype=torch.float32)
    if agg == "token-mean":
        scale, w_B = sum(lens) / T, torch.full((len(lens),), 1.0 / T)
    elif agg == "seq-mean-token-mean":
        scale = float(sum(x > 0 for x in lens)) / n_ne
        w_B = torch.where(len_t > 0, 1.0 / (n_ne * len_t.clamp(min=1)), 0.0)
    else:
        scale, w_B = len(lens) * max(max(lens, default=0), 1) / (B * lmax), torch.full((len(lens),), 1.0 / (B * lmax))
    return scale, w_B.repeat_interleave(torch.tensor(lens, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------- losses
def rl_loss(model, mb: dict, g: GRPOConfig, temperature: float):
    """grpo_loss on one micro-batch of whole groups, KL in the reward or the loss, globally normalised."""
    topk = g.kl == "topk" and "ref_topk_ids" in mb
    out = _forward(model, mb, temperature=temperature, return_entropy=True,
                   topk_ids=mb["ref_topk_ids"] if topk else None)
    return rl_loss_from_outputs(out, mb, g)


def rl_loss_from_outputs(out: dict, mb: dict, g: GRPOConfig):
    """rl_loss given the policy's outputs on the response tokens: logprobs, entropy (and topk_logprobs)."""
    topk = g.kl == "topk" and "ref_topk_ids" in mb
    lp = out["logprobs"]
    old = mb["old_lp"] if "old_lp" in mb else lp.detach()
    kl_T = None
    if topk:
        kl_T = topk_kl(out["topk_logprobs"], mb["ref_topk_lp"])
    elif "ref_lp" in mb:
        kl_T = sampled_kl(lp, mb["ref_lp"], g.kl)
    in_reward = g.beta > 0 and g.kl_placement == "reward"
    sampled_in_loss = g.beta > 0 and g.kl_placement == "loss" and not topk
    token_adv = None
    if in_reward:  # KL_t of the rollout policy: precomputed when the batch serves several steps
        token_adv = kl_penalty_token_adv(mb["old_kl"] if "old_kl" in mb else kl_T.detach(), mb["resp_cu"], g.beta)
    loss, st = grpo_loss(lp, old, mb["ref_lp"] if sampled_in_loss else None, mb["rewards"], mb["resp_cu"],
                         g.group_size, eps_low=g.eps_low, eps_high=g.eps_high,
                         beta=g.beta if sampled_in_loss else 0.0, kl=g.kl if sampled_in_loss else "k3",
                         agg=g.agg, adv_norm=g.adv_norm, token_adv=token_adv)
    loss = loss * mb["agg_scale"]
    if g.beta > 0 and g.kl_placement == "loss" and topk:
        loss = loss + g.beta * (kl_T * mb["tok_w"]).sum()
    n = float(lp.shape[0])
    stats = {"resp_tokens": n, "clip_tokens": st["clip_frac"] * n, "entropy_sum": out["entropy"].detach().sum(),
             "ratio_sum": st["ratio_mean"] * n}
    if kl_T is not None:
        stats["kl_sum"] = kl_T.detach().sum()
    return loss, stats


def ptx_loss(model, mb: dict, g: GRPOConfig):
    """gamma * sum_t w_t KL_topk(pi_theta || pi_ref)_t over SFT supervised tokens, w_t = 1 / (tokens, global)."""
    return ptx_loss_from_outputs(_forward(model, mb, topk_ids=mb["ref_topk_ids"]), mb, g)


def ptx_loss_from_outputs(out: dict, mb: dict, g: GRPOConfig):
    """ptx_loss given the policy's top-k log-probs (temperature 1) at the reference's ids of the supervised tokens."""
    kl_T = topk_kl(out["topk_logprobs"], mb["ref_topk_lp"])
    return g.ptx_coef * (kl_T * mb["w"]).sum(), {"ptx_kl_sum": kl_T.detach().sum(),
                                                 "ptx_tokens": float(kl_T.shape[0])}


def make_loss_fn(g: GRPOConfig, temperature: float):
    def loss_fn(model, mb):
        return ptx_loss(model, mb, g) if mb["kind"] == "ptx" else rl_loss(model, mb, g, temperature)

    return loss_fn


# ----------------------------------------------------------------------------------------------- the run
class GRPORun:
    """State of one GRPO run: policy + trainer, reference, rollout generator, rewards, prompt sampler, PTX data."""

    shared_prefix = False
    """Whether micro_batches use the shared-prefix layout (set in __init__ from grpo.shared_prefix and the model)."""
    dp_group = None
    """Process group of the data-parallel ranks for token totals (None: all ranks; the megatron backend's DP group)."""

    def __init__(self, cfg: Config):
        from nova_rt.rewards import build_reward
        from nova_rt.rollout.engine import Sampling, build_rollout_engine

        self.cfg, self.g = cfg, cfg.grpo
        self.info, self.run_dir = setup(cfg)
        if self.info.distributed and cfg.parallel.data_parallel == "fsdp2":
            raise ValueError("grpo generates on every rank independently; use parallel.data_parallel=ddp")
        g, world = self.g, self.info.world_size
        if g.prompts_per_step % world or cfg.train.max_steps % g.steps_per_rollout:
            raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} must divide by world_size={world}, and "
                             f"train.max_steps={cfg.train.max_steps} by ppo_epochs x minibatches="
                             f"{g.steps_per_rollout}")
        self.hf, self.tok = load_policy(cfg)
        # the data-parallel view (the megatron backend narrows it to its DP group in build_trainer)
        self.dp_rank, self.dp_size, self.dp_sum = self.info.rank, world, all_reduce_sum
        self.trainer = self.build_trainer()
        self.ref = self._load_ref() if g.needs_ref else None
        self.shared_prefix = (g.shared_prefix and cfg.parallel.backend == "hf" and supports_shared_prefix(self.hf)
                              and (self.ref is None or supports_shared_prefix(self.ref.lm)))
        self.generator = build_rollout_engine(
            g.rollout, self.hf, self.tok,
            Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                     seed=cfg.run.seed * 1000 + self.info.rank, batch_size=g.rollout_batch),
            policy_version=lambda: self.trainer.step, backend=cfg.parallel.backend)
        self.reward = build_reward(g.rewards, base_dir=cfg.config_dir)
        self._load_prompts()
        self.ptx = self._load_ptx() if g.ptx_coef > 0 else None
        self.prompt_ids = PromptEncoder(self.tok, g.pas_model)
        self.loss_fn = make_loss_fn(g, g.temperature)

    def build_trainer(self):
        return Trainer(self.cfg, self.info, PolicyLogprobs(self.hf), run_dir=self.run_dir)

    def _load_ref(self):
        ref_hf, _ = load_policy(self.cfg, self.g.ref_model or None)
        ref = PolicyLogprobs(ref_hf).to(self.info.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _load_prompts(self) -> None:
        g, cfg = self.g, self.cfg
        pools, self.eval_pools, base = build_prompt_sets(data_files(cfg, g.prompt_files), data_files(cfg, g.eval_files),
                                                         g.gym_tasks, g.system_prompt, cfg.data.on_error)
        self.base_weights = normalise_weights({**base, **g.category_weights}, sorted(pools))
        self.sampler = CategorySampler(pools, self.base_weights, seed=cfg.run.seed)
        if self.info.is_main:
            log.info("RL prompts per category: %s; eval: %s", {c: len(p) for c, p in pools.items()},
                     {c: len(p) for c, p in self.eval_pools.items()})

    def _load_ptx(self) -> list[Sample]:
        from nova_rt.data.sft import load_sft_samples

        samples, _ = load_sft_samples(data_files(self.cfg, self.g.ptx_files), self.tok,
                                      max_seq_len=self.g.ptx_max_len, system_prompt=self.cfg.data.system_prompt)
        if len(samples) < self.g.ptx_batch or self.g.ptx_batch % self.dp_size:
            raise ValueError(f"grpo.ptx_batch={self.g.ptx_batch} must be <= the {len(samples)} PTX samples and "
                             f"divide by the data-parallel size {self.dp_size}")
        return samples

    def score(self, texts: list[str], samples: list[dict]) -> tuple[list[float], dict, list[float] | None]:
        total, per = self.reward(texts, samples)
        return total, per, self.reward.correctness(per)

    # ------------------------------------------------------------------------------------------- rollouts
    def collect(self) -> tuple[list[dict], dict]:
        """This rank's groups for one step ({prompt, responses, rewards}) and global rollout metrics."""
        g, rank, world = self.g, self.dp_rank, self.dp_size
        per_rank, G = g.prompts_per_step // world, g.group_size
        kept, dropped, sums = [], [], torch.zeros(7, dtype=torch.float64)
        for _ in range(1 + (g.dynamic_max_rounds if g.dynamic_sampling else 0)):
            mine = self.sampler.draw(g.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
            ro = self.generator.generate(self.prompt_ids(mine), G)
            total, _, correct = self.score(ro.texts, [s for s in mine for _ in range(G)])
            lens = [len(r) for r in ro.response_ids]
            sums += torch.tensor([len(total), sum(total), sum(x * x for x in total),
                                  sum(correct) if correct is not None else 0.0, sum(lens),
                                  len(lens) - sum(ro.finished), 0.0], dtype=torch.float64)
            for j in range(len(mine)):
                grp = {"prompt": ro.prompt_ids[j * G], "responses": ro.response_ids[j * G:(j + 1) * G],
                       "rewards": total[j * G:(j + 1) * G]}
                same = max(grp["rewards"]) - min(grp["rewards"]) <= 1e-9
                sums[6] += float(same)
                (dropped if g.dynamic_sampling and same else kept).append(grp)
            kept = kept[:per_rank]
            if not g.dynamic_sampling:
                break
            n = self.dp_sum(torch.tensor([float(len(kept))], dtype=torch.float64))
            if n.item() >= g.prompts_per_step:
                break
        if len(kept) < g.minibatches:  # every rank must take part in every optimizer step
            kept += dropped[:g.minibatches - len(kept)]
        n_kept = self.dp_sum(torch.tensor([float(len(kept))], dtype=torch.float64)).item()
        self.dp_sum(sums)
        n, mean = sums[0].item(), sums[1].item() / sums[0].item()
        metrics = {"reward_mean": mean, "reward_std": max(sums[2].item() / n - mean * mean, 0.0) ** 0.5,
                   "response_len": sums[4].item() / n, "truncated_frac": sums[5].item() / n,
                   "equal_reward_group_frac": sums[6].item() / (n / G), "groups_trained": n_kept}
        if self.reward.verifiable:
            metrics["accuracy"] = sums[3].item() / n
        return kept, metrics

    # ------------------------------------------------------------------------------------------- micro-batches
    def _to_dev(self, mb: dict) -> dict:
        return {k: v.to(self.info.device) if isinstance(v, (torch.Tensor, SharedPrefixLayout)) else v
                for k, v in mb.items()}

    def _ref_topk(self, mb: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        from nova_rt.kernels.topk_select import reference_topk

        hidden = self.ref.selected_hidden(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"],
                                          mb["targets"], mb.get("shared_prefix"))
        weight = self.ref.head_weight(hidden.dtype)
        return reference_topk(hidden, weight, min(self.g.topk, weight.shape[0]), temperature=temperature)

    @torch.no_grad()
    def precompute(self, mb: dict) -> dict:
        """Reference top-k ids / log-probs (or sampled-token log-probs) and, for reused batches, old log-probs."""
        g, T = self.g, self.g.temperature
        mb = self._to_dev(mb)
        with self.trainer.autocast():
            if self.ref is not None and g.beta > 0:
                if g.kl == "topk":
                    mb["ref_topk_ids"], mb["ref_topk_lp"] = self._ref_topk(mb, T)
                else:
                    mb["ref_lp"] = _forward(self.ref, mb, temperature=T)["logprobs"]
            if g.steps_per_rollout > 1:
                out = _forward(self.trainer.raw, mb, temperature=T, topk_ids=mb.get("ref_topk_ids"))
                mb["old_lp"] = out["logprobs"]
                if g.beta > 0 and g.kl_placement == "reward":
                    mb["old_kl"] = topk_kl(out["topk_logprobs"], mb["ref_topk_lp"]) if g.kl == "topk" \
                        else sampled_kl(out["logprobs"], mb["ref_lp"], g.kl)
        return mb

    def micro_batches(self, groups: list[dict]) -> list[dict]:
        g = self.g
        totals = agg_totals([len(r) for grp in groups for r in grp["responses"]], self.dp_group)
        if g.agg == "seq-mean-token-sum-norm" and g.sum_norm_len > 0:
            totals[3] = float(g.sum_norm_len)  # a constant L instead of the longest response
        step = g.micro_prompts or max(len(groups), 1)
        mbs = []
        for i in range(0, len(groups), step):
            part = groups[i:i + step]
            responses = [r for grp in part for r in grp["responses"]]
            mb = pack_responses([grp["prompt"] for grp in part for _ in grp["responses"]], responses,
                                shared_prefix=self.shared_prefix)
            scale, tok_w = agg_scale_and_weights(g.agg, [len(r) for r in responses], totals)
            mb.update(kind="rl", agg_scale=scale, tok_w=tok_w,
                      rewards=torch.tensor([x for grp in part for x in grp["rewards"]], dtype=torch.float32))
            mbs.append(self.precompute(mb))
        return mbs

    @torch.no_grad()
    def ptx_micro_batches(self, r: int) -> list[dict]:
        """This data-parallel rank's share of the PTX rows of rollout step r (a pure function of r: resumable)."""
        n, B, world, rank = len(self.ptx), self.g.ptx_batch, self.dp_size, self.dp_rank
        idx = []
        for j in range(r * B, (r + 1) * B):
            epoch, pos = divmod(j, n)
            idx.append(int(epoch_permutation(n, self.cfg.run.seed + 17, epoch)[pos]))
        rows = [self.ptx[i] for i in idx]
        total = sum(s.n_supervised for s in rows)
        per = B // world
        mb = self._to_dev(collate([make_row(rows[rank * per:(rank + 1) * per])]))
        n_sup = int((mb["targets"] != IGNORE).sum())
        mb.update(kind="ptx", w=torch.full((n_sup,), 1.0 / max(total, 1), device=self.info.device))
        with self.trainer.autocast():
            mb["ref_topk_ids"], mb["ref_topk_lp"] = self._ref_topk(mb, 1.0)
        return [mb]

    # ------------------------------------------------------------------------------------------- training
    def train_on(self, groups: list[dict], r: int) -> dict:
        """ppo_epochs x minibatches optimizer steps on one rollout batch; metrics averaged over them."""
        g = self.g
        parts = [[groups[i] for i in idx] for idx in np.array_split(np.arange(len(groups)), g.minibatches)]
        mb_parts = [self.micro_batches(p) for p in parts]
        ptx = self.ptx_micro_batches(r) if self.ptx is not None else []
        sums: dict[str, float] = {}
        for _ in range(g.ppo_epochs):
            for mbs in mb_parts:
                st = self.trainer.train_step(mbs + ptx, self.loss_fn)
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + v
        steps, tok = g.steps_per_rollout, max(sums["resp_tokens"], 1.0)
        out = {"loss": sums["loss"] / steps, "grad_norm": sums["grad_norm"] / steps, "lr": st["lr"],
               "clip_frac": sums["clip_tokens"] / tok,
               "entropy": sums["entropy_sum"] / tok, "ratio_mean": sums["ratio_sum"] / tok}
        if "kl_sum" in sums:
            out["kl"] = sums["kl_sum"] / tok
        if "ptx_kl_sum" in sums:
            out["ptx_kl"] = sums["ptx_kl_sum"] / max(sums["ptx_tokens"], 1.0)
        if "nonfinite_skipped" in st:  # a running total (kept across resumes), not a per-step value
            out["nonfinite_skipped"] = st["nonfinite_skipped"]
        return out

    # ------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Greedy per-category eval over all ranks (each takes every world_size-th prompt)."""
        def score(texts, samples):
            total, _, correct = self.score(texts, samples)
            return total, correct

        return evaluate_categories(
            self.eval_pools, lambda chunk: self.generator.generate(self.prompt_ids(chunk), 1, greedy=True).texts,
            score, self.g.eval_batch, self.dp_rank, self.dp_size,
            lambda xs: self.dp_sum(torch.tensor(xs, dtype=torch.float64)).tolist())

    def eval_metrics(self, reweight_after: bool) -> dict:
        res = self.evaluate()
        self.eval_items = {c: v.pop("correct") for c, v in res.items()}  # per prompt, for write_eval
        if not res:
            return {}
        n = sum(v["n"] for v in res.values())
        m = {"eval_accuracy": sum(v["accuracy"] * v["n"] for v in res.values()) / n, "eval_n": float(n)}
        for c, v in res.items():
            m[f"eval_accuracy/{c}"], m[f"eval_reward/{c}"] = v["accuracy"], v["reward"]
            m[f"eval_n/{c}"] = float(v["n"])
        if reweight_after and self.g.reweight:
            self.sampler.weights = reweight(self.sampler.weights, self.base_weights,
                                            {c: v["accuracy"] for c, v in res.items()},
                                            max_ratio=self.g.reweight_max_ratio, rate=self.g.reweight_rate)
        m.update({f"weight/{c}": w for c, w in self.sampler.weights.items()})
        return m

    # ------------------------------------------------------------------------------------------- loop
    def state(self) -> dict:
        return {"grpo": {"sampler": self.sampler.state_dict(), "rollout": self.generator.state_dict(),
                         "category_weights": dict(self.sampler.weights)}}

    def run(self) -> dict:
        cfg, g, tr = self.cfg, self.g, self.trainer
        extra = tr.maybe_resume()
        if extra and "grpo" in extra:
            self.sampler.load_state_dict(extra["grpo"]["sampler"])
            self.generator.load_state_dict(extra["grpo"]["rollout"])
        tel = Telemetry(self.run_dir, enabled=self.info.is_main, tensorboard=cfg.logging.tensorboard,
                        progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps // g.steps_per_rollout,
                        start_step=tr.step, local_rank=self.info.local_rank)
        every, k = cfg.checkpoint.every, g.steps_per_rollout
        while tr.step < cfg.train.max_steps:
            r, t0 = tr.step // k, time.perf_counter()
            metrics = self.eval_metrics(True) if g.eval_every and r % g.eval_every == 0 else {}
            if metrics and tr.step == 0:
                self.write_eval("eval_initial.json", metrics)
            t1 = time.perf_counter()
            groups, rm = self.collect()
            rm.update(self.generator.pop_metrics())  # vllm: rollout_sync_s, rollout_logprob_abs_diff(_max)
            t2 = time.perf_counter()
            metrics.update(rm, **self.train_on(groups, r))
            metrics.update(rollout_time_s=t2 - t1, train_time_s=time.perf_counter() - t2,
                           step_time_s=time.perf_counter() - t0, rollout_step=r)
            tel.log(tr.step, metrics)
            if every > 0 and tr.step // every > (tr.step - k) // every and tr.step < cfg.train.max_steps:
                tr.save_checkpoint(self.state())
        final_eval = self.eval_metrics(False) if g.eval_every else {}
        self.generator.close()  # vllm: before torch.distributed goes down
        if final_eval:
            self.write_eval("eval_final.json", final_eval)
        tel.close(plot=cfg.logging.plot, keys=("loss", "reward_mean", "kl", "response_len"))
        return {"final": self.save_final(), "eval": final_eval}

    def write_eval(self, name: str, metrics: dict) -> None:
        """run_dir/name: the eval metrics and each category's per-prompt correctness (eval_initial.json before any
        update, eval_final.json after the last step: report.md compares them prompt by prompt)."""
        if self.info.is_main:
            out = {"step": self.trainer.step, **metrics, "correct": self.eval_items}
            tmp = self.run_dir / f"{name}.tmp"
            tmp.write_text(json.dumps(out, indent=2))
            os.replace(tmp, self.run_dir / name)

    def save_final(self) -> str | None:
        return save_final_policy(self.cfg, self.info, self.trainer, self.hf, self.tok, self.run_dir)


@register_stage("grpo")
def run(cfg: Config) -> dict:
    if cfg.parallel.backend == "megatron":
        from nova_rt.stages.grpo_megatron import MegatronGRPORun

        return MegatronGRPORun(cfg).run()
    return GRPORun(cfg).run()
