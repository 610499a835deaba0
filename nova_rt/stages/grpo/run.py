"""The GRPO stage's loop (GRPORun): rollouts, rewards, dynamic sampling, micro-batches with reference / old
log-probs, optimizer steps, per-category eval and re-weighting, checkpoints and exact resume (see the package
docstring, nova_rt.stages.grpo, for one step in full)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace

import numpy as np
import torch

from nova_rt.backends import get_backend
from nova_rt.config import Config
from nova_rt.data.chat import IGNORE, Sample
from nova_rt.data.micro_batch import PackedBatch
from nova_rt.data.packing import collate, epoch_permutation, make_row
from nova_rt.data.rl import (
    CategorySampler,
    PromptEncoder,
    build_prompt_sets,
    evaluate_categories,
    normalise_weights,
    reweight,
)
from nova_rt.losses.kl import sampled_kl, topk_kl
from nova_rt.stages.common import data_files, setup
from nova_rt.stages.grpo.advantages import estimate_advantages, zero_advantage_counts
from nova_rt.stages.grpo.batches import (
    PTXBatch,
    RolloutBatch,
    RolloutGroup,
    RolloutStats,
    agg_scale_and_weights,
    agg_totals,
    pack_responses,
)
from nova_rt.stages.grpo.episodes import (
    build_driver,
    episode_metrics,
    greedy_episodes,
    new_sums,
    sample_episode_groups,
)
from nova_rt.stages.grpo.losses import behaviour_logprobs, make_objective
from nova_rt.telemetry import Telemetry

log = logging.getLogger("nova_rt.grpo")


class GRPORun:
    """State of one GRPO run: policy + trainer, reference, rollout generator, rewards, prompt sampler, PTX data."""

    shared_prefix = False
    """Whether micro_batches use the shared-prefix layout (set in __init__ from grpo.shared_prefix and the model)."""
    multiturn = None
    """The episode driver (nova_rt.rollout.multiturn.MultiTurnDriver) when grpo.env is set, else None."""
    dp_group = None
    """Process group of the data-parallel ranks for token totals (None: all ranks; the megatron backend's DP group)."""

    def __init__(self, cfg: Config):
        from nova_rt.models.loading import to_dtype
        from nova_rt.rewards import build_reward
        from nova_rt.rollout.engine import Sampling, build_rollout_engine

        self.cfg, self.grpo = cfg, cfg.grpo
        self.info, self.run_dir = setup(cfg)
        if self.info.distributed and cfg.parallel.data_parallel == "fsdp2":
            raise ValueError("grpo generates on every rank independently; use parallel.data_parallel=ddp")
        grpo, world = self.grpo, self.info.world_size
        if grpo.sampling.prompts_per_step % world or cfg.train.max_steps % grpo.steps_per_rollout:
            raise ValueError(f"grpo.sampling.prompts_per_step={grpo.sampling.prompts_per_step} must divide by "
                             f"world_size={world}, and train.max_steps={cfg.train.max_steps} by ppo_epochs x "
                             f"minibatches={grpo.steps_per_rollout}")
        # the trained policy (a Policy, nova_rt.backends) and the HF model rollouts generate with
        self.trainer, self.tok = get_backend(cfg.parallel.backend).build(cfg, self.info, self.run_dir, head="policy")
        self.hf = self.trainer.hf_model
        self.step_options = {"temperature": grpo.sampling.temperature, "entropy": True, "at_ref_topk": True}
        """The output options of every train_step (PTX rows override temperature and entropy)."""
        policy = self.trainer  # the data-parallel view (on megatron: its DP group)
        self.dp_rank, self.dp_size, self.dp_sum = policy.dp_rank, policy.dp_size, policy.dp_sum
        self.zero_advantage_steps = 0  # steps of this invocation where every advantage was 0 (with_advantages)
        self.dp_group = policy.dp_group
        self.ref = policy.reference(grpo.ref_model or None) if grpo.needs_ref else None
        self.shared_prefix = (grpo.shared_prefix and policy.supports_shared_prefix
                              and (self.ref is None or self.ref.supports_shared_prefix))
        sampling = grpo.sampling
        self.generator = build_rollout_engine(
            grpo.rollout, self.hf, self.tok,
            Sampling(max_new_tokens=grpo.env.max_new_tokens_per_turn if grpo.env.enabled else sampling.max_new_tokens,
                     temperature=sampling.temperature, top_p=sampling.top_p,
                     top_k=sampling.top_k, seed=cfg.run.seed * 1000 + self.info.rank,
                     batch_size=sampling.rollout_batch),
            policy_version=lambda: self.trainer.step, backend=cfg.parallel.backend, dtype=to_dtype(cfg.model.dtype),
            work_dir=self.run_dir)
        self.reward = build_reward(grpo.rewards, base_dir=cfg.config_dir)
        self._load_prompts()
        self.ptx = self._load_ptx() if grpo.ptx.coef > 0 else None
        self.prompt_ids = PromptEncoder(self.tok, grpo.data.pas_model)
        self.loss_fn = make_objective(grpo)
        self.multiturn = build_driver(self) if grpo.env.enabled else None

    def _load_prompts(self) -> None:
        data, cfg = self.grpo.data, self.cfg
        pools, self.eval_pools, base = build_prompt_sets(data_files(cfg, data.prompt_files),
                                                         data_files(cfg, data.eval_files), data.gym_tasks,
                                                         data.system_prompt, cfg.data.on_error, self.tok)
        self.base_weights = normalise_weights({**base, **data.category_weights}, sorted(pools))
        self.sampler = CategorySampler(pools, self.base_weights, seed=cfg.run.seed)
        if self.info.is_main:
            log.info("RL prompts per category: %s; eval: %s", {c: len(p) for c, p in pools.items()},
                     {c: len(p) for c, p in self.eval_pools.items()})

    def _load_ptx(self) -> list[Sample]:
        from nova_rt.data.sft import load_sft_samples

        ptx = self.grpo.ptx
        samples, _ = load_sft_samples(data_files(self.cfg, ptx.files), self.tok, max_seq_len=ptx.max_len,
                                      system_prompt=self.cfg.data.system_prompt)
        if len(samples) < ptx.batch or ptx.batch % self.dp_size:
            raise ValueError(f"grpo.ptx.batch={ptx.batch} must be <= the {len(samples)} PTX samples and "
                             f"divide by the data-parallel size {self.dp_size}")
        return samples

    def score(self, texts: list[str], samples: list[dict]) -> tuple[list[float], dict, list[float] | None]:
        total, per = self.reward(texts, samples)
        return total, per, self.reward.correctness(per)

    # ------------------------------------------------------------------------------------------- rollouts
    def collect(self) -> tuple[list[RolloutGroup], dict]:
        """This rank's groups for one step and global rollout metrics, generated with the policy's current weights
        once per data-parallel replica."""
        self.trainer.sync_generation_model()
        return self.trainer.once_per_replica(self._collect)

    def _sample_groups(self, mine: list[dict], group_size: int) -> tuple[list[RolloutGroup], list[bool],
                                                                       RolloutStats]:
        """Single-turn: G sampled replies per drawn prompt, scored; (groups, all-rewards-equal per group, stats)."""
        rollout = self.generator.generate(self.prompt_ids(mine), group_size)
        total, _, correct = self.score(rollout.texts, [sample for sample in mine for _ in range(group_size)])
        lengths = [len(response) for response in rollout.response_ids]
        groups, same_flags = [], []
        for index in range(len(mine)):
            span = slice(index * group_size, (index + 1) * group_size)
            groups.append(RolloutGroup(rollout.prompt_ids[index * group_size], rollout.response_ids[span],
                                       total[span], rollout.logprobs[span]))
            same_flags.append(max(total[span]) - min(total[span]) <= 1e-9)
        stats = RolloutStats(
            samples=len(total), reward_sum=sum(total), reward_square_sum=sum(x * x for x in total),
            correct_sum=sum(correct) if correct is not None else 0.0, response_tokens=sum(lengths),
            truncated=len(lengths) - sum(rollout.finished), equal_reward_groups=float(sum(same_flags)))
        return groups, same_flags, stats

    def _collect(self) -> tuple[list[RolloutGroup], dict]:
        grpo, rank, world = self.grpo, self.dp_rank, self.dp_size
        sampling = grpo.sampling
        per_rank, group_size = sampling.prompts_per_step // world, sampling.group_size
        kept, dropped, stats, episode_sums = [], [], RolloutStats(), new_sums()
        for _ in range(1 + (sampling.dynamic_max_rounds if sampling.dynamic_sampling else 0)):
            mine = self.sampler.draw(sampling.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
            if self.multiturn is not None:
                groups, same_flags, round_stats = sample_episode_groups(self, mine, group_size, episode_sums)
            else:
                groups, same_flags, round_stats = self._sample_groups(mine, group_size)
            for group, same in zip(groups, same_flags):
                (dropped if sampling.dynamic_sampling and same else kept).append(group)
            stats = stats + round_stats
            kept = kept[:per_rank]
            if not sampling.dynamic_sampling:
                break
            kept_total = self.dp_sum(torch.tensor([float(len(kept))], dtype=torch.float64))
            if kept_total.item() >= sampling.prompts_per_step:
                break
        if len(kept) < grpo.minibatches:  # every rank must take part in every optimizer step
            kept += dropped[:grpo.minibatches - len(kept)]
        groups_trained = self.dp_sum(torch.tensor([float(len(kept))], dtype=torch.float64)).item()
        metrics = stats.dp_summed(self.dp_sum).metrics(group_size, groups_trained,
                                                       self.reward.verifiable or self.multiturn is not None)
        if self.multiturn is not None:
            metrics.update(episode_metrics(self, episode_sums))
        return kept, metrics

    # ------------------------------------------------------------------------------------------- micro-batches
    def _ref_topk(self, mb: PackedBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's top-k ids and log-probs at the target tokens."""
        return self.ref.forward([mb], _topk, temperature=temperature, topk=self.grpo.loss.topk, autocast=True)[0]

    @torch.no_grad()
    def precompute(self, mb: RolloutBatch) -> RolloutBatch:
        """Reference top-k ids / log-probs (or sampled-token log-probs) and, for reused batches, old log-probs (at
        the reference's top-k ids too, for the top-k KL in the reward)."""
        loss, temperature = self.grpo.loss, self.grpo.sampling.temperature
        mb = mb.to(self.info.device)
        if self.ref is not None and loss.beta > 0:
            if loss.kl == "topk":
                ref_topk_ids, ref_topk_logprobs = self._ref_topk(mb, temperature)
                mb = replace(mb, ref_topk_ids=ref_topk_ids, ref_topk_logprobs=ref_topk_logprobs)
            else:
                outputs = self.ref.forward([mb], _outputs, temperature=temperature, autocast=True)[0]
                mb = replace(mb, ref_logprobs=outputs["logprobs"])
        if self.grpo.steps_per_rollout > 1:
            outputs = self.trainer.forward([mb], _outputs, temperature=temperature, at_ref_topk=True, autocast=True)[0]
            old_kl = None
            if loss.beta > 0 and loss.kl_placement == "reward":
                old_kl = topk_kl(outputs["topk_logprobs"], mb.ref_topk_logprobs) if loss.kl == "topk" \
                    else sampled_kl(outputs["logprobs"], mb.ref_logprobs, loss.kl)
            mb = replace(mb, old_logprobs=outputs["logprobs"], old_kl=old_kl)
        return mb

    def micro_batches(self, groups: list[RolloutGroup]) -> list[RolloutBatch]:
        grpo = self.grpo
        totals = agg_totals([length for group in groups for length in group.target_lengths()], self.dp_group)
        if grpo.loss.agg == "seq-mean-token-sum-norm" and grpo.loss.sum_norm_len > 0:
            totals = replace(totals, longest=float(grpo.loss.sum_norm_len))  # a constant L, not the longest response
        step = grpo.micro_prompts or max(len(groups), 1)
        batches = []
        for start in range(0, len(groups), step):
            part = groups[start:start + step]
            responses = [response for group in part for response in group.responses]
            masks = None
            if any(group.response_masks is not None for group in part):  # multi-turn: sampled tokens are targets
                masks = [mask for group in part for mask in (group.response_masks or
                                                             [[True] * len(r) for r in group.responses])]
            packed = pack_responses([group.prompt for group in part for _ in group.responses], responses,
                                    shared_prefix=self.shared_prefix, response_masks=masks)
            scale, token_weights = agg_scale_and_weights(
                grpo.loss.agg, [length for group in part for length in group.target_lengths()], totals)
            rollout_logprobs = None
            if grpo.rollout.correction != "none":  # the engine's sampling log-probs, flat in response-token order
                rollout_logprobs = torch.tensor(behaviour_logprobs(part, grpo.rollout.correction),
                                                dtype=torch.float32)
            rewards = torch.tensor([x for group in part for x in group.rewards], dtype=torch.float32)
            advantages = None
            if part and all(group.advantages is not None for group in part):
                advantages = torch.tensor([x for group in part for x in group.advantages], dtype=torch.float32)
            batches.append(self.precompute(RolloutBatch(**vars(packed), rewards=rewards, advantages=advantages,
                                                        agg_scale=scale, token_weights=token_weights,
                                                        rollout_logprobs=rollout_logprobs)))
        return batches

    @torch.no_grad()
    def ptx_micro_batches(self, rollout_step: int) -> list[PTXBatch]:
        """This data-parallel rank's share of the PTX rows of a rollout step (a pure function of it: resumable)."""
        count, batch, rank = len(self.ptx), self.grpo.ptx.batch, self.dp_rank
        indices = []
        for position in range(rollout_step * batch, (rollout_step + 1) * batch):
            epoch, offset = divmod(position, count)
            indices.append(int(epoch_permutation(count, self.cfg.run.seed + 17, epoch)[offset]))
        rows = [self.ptx[i] for i in indices]
        total = sum(row.n_supervised for row in rows)
        per_rank = batch // self.dp_size
        # PTX rows: temperature 1 and no entropy (RL rows: grpo.sampling.temperature)
        packed = PackedBatch.from_collated(collate([make_row(rows[rank * per_rank:(rank + 1) * per_rank])]),
                                           temperature=1.0, entropy=False).to(self.info.device)
        supervised = int((packed.targets != IGNORE).sum())
        token_weights = torch.full((supervised,), 1.0 / max(total, 1), device=self.info.device)
        ref_topk_ids, ref_topk_logprobs = self._ref_topk(packed, 1.0)
        return [PTXBatch(**{**vars(packed), "ref_topk_ids": ref_topk_ids}, token_weights=token_weights,
                         ref_topk_logprobs=ref_topk_logprobs)]

    # ------------------------------------------------------------------------------------------- training
    def with_advantages(self, groups: list[RolloutGroup], rollout_step: int) -> tuple[list[RolloutGroup], dict]:
        """The groups with grpo.loss.advantage's advantages (global over the data-parallel ranks; `group` is left
        to grpo_loss), and zero_adv_frac: the share of responses, all ranks, whose advantage is exactly 0. A step
        where every advantage is 0 trains only the KL / PTX terms: it is logged and counted."""
        loss = self.grpo.loss
        advantages = estimate_advantages([group.rewards for group in groups],
                                         [group.target_lengths() for group in groups],
                                         loss.advantage, loss.adv_norm, self.dp_sum)
        zero, total = zero_advantage_counts(advantages, self.dp_sum)
        if total > 0 and zero == total:
            self.zero_advantage_steps += 1
            if self.info.is_main:
                log.warning("rollout step %d: every advantage is 0 (grpo.loss.advantage=%s: all rewards equal within "
                            "each group or over the step), so it trains only the KL / PTX terms; %d such step(s) so "
                            "far in this run", rollout_step, loss.advantage, self.zero_advantage_steps)
        if loss.advantage != "group":
            groups = [replace(group, advantages=values) for group, values in zip(groups, advantages)]
        return groups, {"zero_adv_frac": zero / max(total, 1.0)}

    def train_on(self, groups: list[RolloutGroup], rollout_step: int) -> dict:
        """ppo_epochs x minibatches optimizer steps on one rollout batch; metrics averaged over them."""
        grpo = self.grpo
        parts = [[groups[i] for i in indices] for indices in np.array_split(np.arange(len(groups)), grpo.minibatches)]
        batch_parts = [self.micro_batches(part) for part in parts]
        ptx = self.ptx_micro_batches(rollout_step) if self.ptx is not None else []
        sums: dict[str, float] = {}
        for _ in range(grpo.ppo_epochs):
            for batches in batch_parts:
                step_stats = self.trainer.train_step(batches + ptx, self.loss_fn, **self.step_options)
                for key, value in step_stats.items():
                    sums[key] = sums.get(key, 0.0) + value
        steps, tokens = grpo.steps_per_rollout, max(sums["resp_tokens"], 1.0)
        out = {"loss": sums["loss"] / steps, "grad_norm": sums["grad_norm"] / steps, "lr": step_stats["lr"],
               "clip_frac": sums["clip_tokens"] / tokens,
               "entropy": sums["entropy_sum"] / tokens, "ratio_mean": sums["ratio_sum"] / tokens}
        if "kl_sum" in sums:
            out["kl"] = sums["kl_sum"] / tokens
        if "is_w_sum" in sums:  # grpo.rollout.correction: mean IS weight, share of zeroed tokens
            out["is_weight_mean"] = sums["is_w_sum"] / tokens
            out["is_masked_frac"] = sums["is_dropped"] / tokens
        if "ptx_kl_sum" in sums:
            out["ptx_kl"] = sums["ptx_kl_sum"] / max(sums["ptx_tokens"], 1.0)
        if "nonfinite_skipped" in step_stats:  # a running total (kept across resumes), not a per-step value
            out["nonfinite_skipped"] = step_stats["nonfinite_skipped"]
        return out

    # ------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Greedy per-category eval over all data-parallel replicas (each takes every dp_size-th prompt)."""
        self.trainer.sync_generation_model()
        return self.trainer.once_per_replica(self._evaluate)

    def _evaluate(self) -> dict[str, dict[str, float]]:
        def score(texts, samples):
            total, _, correct = self.score(texts, samples)
            return total, correct

        generate = lambda chunk: self.generator.generate(self.prompt_ids(chunk), 1, greedy=True).texts  # noqa: E731
        if self.multiturn is not None:  # held-out success: greedy episodes played to the end
            generate, score = greedy_episodes(self)
        return evaluate_categories(
            self.eval_pools, generate, score, self.grpo.eval.batch, self.dp_rank, self.dp_size,
            lambda values: self.dp_sum(torch.tensor(values, dtype=torch.float64)).tolist())

    def eval_metrics(self, reweight_after: bool) -> dict:
        results = self.evaluate()
        self.eval_items = {c: v.pop("correct") for c, v in results.items()}  # per prompt, for write_eval
        if not results:
            return {}
        count = sum(v["n"] for v in results.values())
        metrics = {"eval_accuracy": sum(v["accuracy"] * v["n"] for v in results.values()) / count,
                   "eval_n": float(count)}
        for category, v in results.items():
            metrics[f"eval_accuracy/{category}"], metrics[f"eval_reward/{category}"] = v["accuracy"], v["reward"]
            metrics[f"eval_n/{category}"] = float(v["n"])
        evaluation = self.grpo.eval
        if reweight_after and evaluation.reweight:
            self.sampler.weights = reweight(self.sampler.weights, self.base_weights,
                                            {c: v["accuracy"] for c, v in results.items()},
                                            max_ratio=evaluation.reweight_max_ratio, rate=evaluation.reweight_rate)
        metrics.update({f"weight/{category}": w for category, w in self.sampler.weights.items()})
        return metrics

    # ------------------------------------------------------------------------------------------- loop
    def state(self) -> dict:
        return {"grpo": {"sampler": self.sampler.state_dict(), "rollout": self.generator.state_dict(),
                         "category_weights": dict(self.sampler.weights)}}

    def restore(self, extra: dict | None) -> None:
        """The sampler and rollout-engine states of a resumed checkpoint's extra state (None: a fresh run)."""
        if extra and "grpo" in extra:
            self.sampler.load_state_dict(extra["grpo"]["sampler"])
            self.generator.load_state_dict(extra["grpo"]["rollout"])

    def run(self) -> dict:
        cfg, grpo, policy = self.cfg, self.grpo, self.trainer
        self.restore(policy.resume())
        steps_per_rollout = grpo.steps_per_rollout
        telemetry = Telemetry(self.run_dir, enabled=self.info.is_main, tensorboard=cfg.logging.tensorboard,
                              progress_bar=cfg.logging.progress_bar,
                              total_steps=cfg.train.max_steps // steps_per_rollout, start_step=policy.step,
                              local_rank=self.info.local_rank)
        every = cfg.checkpoint.every
        while policy.step < cfg.train.max_steps:
            rollout_step, t0 = policy.step // steps_per_rollout, time.perf_counter()
            metrics = self.eval_metrics(True) if grpo.eval.every and rollout_step % grpo.eval.every == 0 else {}
            if metrics and policy.step == 0:
                self.write_eval("eval_initial.json", metrics)
            t1 = time.perf_counter()
            groups, rollout_metrics = self.collect()
            rollout_metrics.update(self.generator.pop_metrics())  # vllm: rollout_sync_s, rollout_logprob_abs_diff
            t2 = time.perf_counter()
            groups, advantage_metrics = self.with_advantages(groups, rollout_step)
            metrics.update(rollout_metrics, **advantage_metrics, **self.train_on(groups, rollout_step))
            metrics.update(rollout_time_s=t2 - t1, train_time_s=time.perf_counter() - t2,
                           step_time_s=time.perf_counter() - t0, rollout_step=rollout_step)
            telemetry.log(policy.step, metrics)
            if every > 0 and policy.step // every > (policy.step - steps_per_rollout) // every \
                    and policy.step < cfg.train.max_steps:
                policy.save_checkpoint(self.state())
        last_state = self.state()  # for the checkpoint of the last step that save_final writes before the model
        final_eval = self.eval_metrics(False) if grpo.eval.every else {}
        self.generator.close()  # vllm: before torch.distributed goes down
        if final_eval:
            self.write_eval("eval_final.json", final_eval)
        telemetry.close(plot=cfg.logging.plot, keys=("loss", "reward_mean", "kl", "response_len"))
        return {"final": self.save_final(last_state), "eval": final_eval}

    def write_eval(self, name: str, metrics: dict) -> None:
        """run_dir/name: the eval metrics and each category's per-prompt correctness (eval_initial.json before any
        update, eval_final.json after the last step: report.md compares them prompt by prompt)."""
        if self.info.is_main:
            out = {"step": self.trainer.step, **metrics, "correct": self.eval_items}
            tmp = self.run_dir / f"{name}.tmp"
            tmp.write_text(json.dumps(out, indent=2))
            os.replace(tmp, self.run_dir / name)

    def save_final(self, extra: dict | None = None) -> str | None:
        return self.trainer.save_final(self.tok, extra)


def _outputs(outputs: dict, mb: PackedBatch) -> dict:
    return outputs


def _topk(outputs: dict, mb: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return outputs["topk_ids"], outputs["topk_logprobs"]


def run(cfg: Config) -> dict:
    """The colocated loop (nova_rt.stages.grpo.async_ registers the grpo stage: this, or the asynchronous one)."""
    return GRPORun(cfg).run()
