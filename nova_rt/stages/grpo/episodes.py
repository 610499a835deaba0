"""Multi-turn episodes in the GRPO stage (grpo.env; nova_rt.envs, nova_rt.rollout.multiturn).

A rollout step plays G episodes per drawn data row with the rollout engine (one turn of every active episode per
generate call); each becomes a RolloutGroup whose prompt is the G opening prompts' common prefix and whose responses
are the rest of each trajectory, with `response_masks` marking the sampled tokens: only they are targets (loss, KL,
entropy, aggregation lengths), environment and tool messages are context. A group with an episode the environment
failed keeps its place in the batch as empty responses (no loss; its reward would be a made-up 0); past
grpo.env.max_error_frac the run stops (exit 2). The reward of an episode is the sum of its turn rewards (plus
grpo.rewards on the final reply with grpo.env.add_rewards); success (accuracy, eval) is an episode reward >= 1,
which the built-in environments give a solved episode. With the vllm engine rollout_logprob_abs_diff compares the
engine's log-probs with the policy's on whole episodes (grpo.rollout.logprob_check of them) once they end.
"""

from __future__ import annotations

import time

import torch

from nova_rt.errors import ConfigError
from nova_rt.rollout.base import logprob_gap
from nova_rt.rollout.multiturn import MultiTurnDriver, check_env_errors, trajectory_logprobs
from nova_rt.stages.grpo.batches import RolloutGroup, RolloutStats

_SUMS = ("episodes", "kept", "turns", "tool_calls", "tool_errors", "env_time_s", "truncated", "failed", "prompt_tokens",
         "cached_tokens")


def build_driver(run) -> MultiTurnDriver:
    """The episode driver over the run's rollout engine and tokenizer; refuses prompt rows with a prefill (the
    environment's reset() opens the conversation)."""
    from nova_rt.envs import build_env_factory

    env = run.grpo.env
    for pools in (run.sampler.pools, run.eval_pools):
        for category, records in pools.items():
            prefilled = next((record for record in records if record.get("prefill")), None)
            if prefilled is not None:
                raise ConfigError(f"grpo.env.type={env.type}: prompt {prefilled['id']} (category {category}) has a "
                                  "prefill; with an environment its reset() opens the conversation: drop 'prefill'")
    if hasattr(run.generator, "check_each_call"):  # vllm: episodes are checked whole (check_episode_logprobs)
        run.generator.check_each_call = False
    return MultiTurnDriver(run.generator, run.tok, build_env_factory(env, base_dir=run.cfg.config_dir), env)


def check_episode_logprobs(run, trajectories) -> None:
    """vllm: rollout_logprob_abs_diff(_max) of the engine's sampling log-probs against a no-grad policy forward on
    grpo.rollout.logprob_check episodes spread evenly over the step's (-1: all), into the engine's metrics."""
    count = run.grpo.rollout.logprob_check
    if run.multiturn.hf_engine or count == 0:
        return
    t0 = time.perf_counter()
    scored = [trajectory for trajectory in trajectories if not trajectory.excluded and trajectory.logprobs]
    if 0 < count < len(scored):
        scored = [scored[round(i * len(scored) / count)] for i in range(count)]
    if scored:
        policy = trajectory_logprobs(run.hf, scored, temperature=run.grpo.sampling.temperature)
        run.generator.metrics.update(logprob_gap([trajectory.logprobs for trajectory in scored], policy),
                                     rollout_logprob_check_s=time.perf_counter() - t0)


def _common_prefix(sequences: list[list[int]]) -> int:
    first, length = sequences[0], min(len(sequence) for sequence in sequences)
    for position in range(length):
        if any(sequence[position] != first[position] for sequence in sequences[1:]):
            return position
    return length


def episode_rewards(run, trajectories, examples: list[dict]) -> list[float]:
    """Each episode's reward: its turn rewards, plus grpo.rewards on its final reply with grpo.env.add_rewards
    (`examples`: the rows the episodes played, indexed by Trajectory.example_index)."""
    rewards = [trajectory.reward for trajectory in trajectories]
    if run.grpo.env.add_rewards:
        samples = [examples[trajectory.example_index] for trajectory in trajectories]
        total, _, _ = run.score([trajectory.final_reply for trajectory in trajectories], samples)
        rewards = [reward + (extra if not trajectory.excluded else 0.0)
                   for reward, extra, trajectory in zip(rewards, total, trajectories)]
    return rewards


def sample_episode_groups(run, mine: list[dict], group_size: int, sums: dict) -> tuple[list[RolloutGroup],
                                                                                   list[bool], RolloutStats]:
    """This rank's groups of one draw (each with `same`: all rewards equal), and its RolloutStats; `sums` gathers
    the episode counts for `episode_metrics`. Every rank calls it (the failure count is all-reduced)."""
    rollout = run.multiturn.run(mine, group_size)
    check_env_errors(rollout, run.grpo.env, run.dp_sum)
    trajectories = rollout.trajectories
    check_episode_logprobs(run, trajectories)
    for name in ("prompt_tokens", "cached_tokens"):
        sums[name] += float(rollout.metrics.get(name, 0))
    rewards = episode_rewards(run, trajectories, mine)
    groups, same_flags = [], []
    stats = RolloutStats()
    for index in range(len(mine)):
        span = slice(index * group_size, (index + 1) * group_size)
        episodes, group_rewards = trajectories[span], rewards[span]
        kept = [trajectory for trajectory in episodes if not trajectory.excluded]
        for trajectory in episodes:
            sums["episodes"] += 1
            sums["failed"] += float(trajectory.excluded)
        for trajectory in kept:
            for name in ("turns", "tool_calls", "tool_errors", "env_time_s", "truncated"):
                sums[name] += float(getattr(trajectory, name))
            sums["kept"] += 1
        tokens = [sum(trajectory.response_mask) for trajectory in episodes]
        stats = stats + RolloutStats(
            samples=len(episodes), reward_sum=sum(group_rewards), reward_square_sum=sum(x * x for x in group_rewards),
            correct_sum=sum(float(reward >= 1.0) for reward in group_rewards), response_tokens=sum(tokens),
            truncated=sum(float(trajectory.truncated) for trajectory in episodes),
            equal_reward_groups=float(max(group_rewards) - min(group_rewards) <= 1e-9))
        if len(kept) < len(episodes):
            # an environment failure: the group keeps its place (every rank keeps its share of the step) as empty
            # responses, which carry no loss; dynamic sampling drops it first
            empty = [[] for _ in episodes]
            groups.append(RolloutGroup([run.tok.eos_token_id or 0] * 2, empty, group_rewards, empty,
                                       response_masks=empty))
            same_flags.append(True)
            continue
        cut = max(_common_prefix([trajectory.token_ids[:trajectory.prompt_len] for trajectory in episodes]), 1)
        groups.append(RolloutGroup(
            episodes[0].token_ids[:cut], [trajectory.token_ids[cut:] for trajectory in episodes], group_rewards,
            [list(trajectory.logprobs) for trajectory in episodes],
            response_masks=[trajectory.sampled_mask[cut:] for trajectory in episodes]))
        same_flags.append(max(group_rewards) - min(group_rewards) <= 1e-9)
    return groups, same_flags, stats


def episode_metrics(run, sums: dict) -> dict:
    """turns_mean, tool_calls_mean, tool_error_frac, env_time_s, episode_truncated_frac, env_error_frac over the
    step's episodes on every data-parallel rank (means over the episodes the environment did not fail)."""
    values = run.dp_sum(torch.tensor([float(sums[name]) for name in _SUMS], dtype=torch.float64)).tolist()
    total = dict(zip(_SUMS, values))
    kept = max(total["kept"], 1.0)
    metrics = {"turns_mean": total["turns"] / kept, "tool_calls_mean": total["tool_calls"] / kept,
               "tool_error_frac": total["tool_errors"] / max(total["tool_calls"], 1.0),
               "env_time_s": total["env_time_s"], "episode_truncated_frac": total["truncated"] / kept,
               "env_error_frac": total["failed"] / max(total["episodes"], 1.0)}
    if run.multiturn.hf_engine:  # (vllm's engine reports its own)
        metrics.update(rollout_prompt_tokens=total["prompt_tokens"],
                       rollout_prefix_cached_tokens=total["cached_tokens"])
    return metrics


def new_sums() -> dict:
    return dict.fromkeys(_SUMS, 0.0)


def greedy_episodes(run):
    """(generate, score) for nova_rt.data.rl.evaluate_categories: one greedy episode per held-out row, played to the
    end; its reward is the episode's, success an episode reward >= 1."""
    stash = {}

    def generate(chunk: list[dict]) -> list[str]:
        rollout = run.multiturn.run(chunk, 1, greedy=True)
        stash["rewards"] = episode_rewards(run, rollout.trajectories, chunk)
        return [trajectory.final_reply for trajectory in rollout.trajectories]

    def score(texts: list[str], samples: list[dict]):
        rewards = stash.pop("rewards")
        return rewards, [float(reward >= 1.0) for reward in rewards]

    return generate, score
