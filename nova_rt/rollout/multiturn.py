"""Multi-turn rollouts: G episodes per data row played against an environment (nova_rt.envs), turn by turn, the
active episodes of all rows sampled together in one engine call per turn (episodes finish at different turns).

Token-in-token-out: a trajectory is the opening prompt's ids, then per turn the ids the engine sampled (never
re-tokenized) and, if the episode goes on, the ids the chat template adds for the environment's messages: the
template's end of the assistant turn (less the EOS the model sampled), then the tokens by which the rendering of the
conversation with the new messages extends its rendering without them (both checked to be prefixes). Only sampled
tokens are marked in `sampled_mask` and carry log-probs. A reply with tool calls (env `tools`) gets the tools'
results; a reply without goes to env.step. An episode ends when the env says done, at grpo.env.max_turns, or at
max_total_tokens (truncated). An env whose constructor / reset / step raises, hangs past step_timeout_s or returns
something malformed ends its episode: `error` names it, reward 0, excluded from the loss (check_env_errors stops
the run past max_error_frac). With the HF decode loop each episode's KV cache carries over to its next turn
(grpo.env.reuse_kv_cache, nova_rt.rollout.turn_cache); vLLM's prefix cache does that for the vllm engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from nova_rt.envs import EnvConfig, EnvError
from nova_rt.envs.tools import call_with_timeout, hung_threads, make_tools, parse_tool_calls, run_tool_calls
from nova_rt.rollout.base import policy_token_logprobs
from nova_rt.rollout.chat_turns import ChatRenderer
from nova_rt.rollout.generate import RolloutGenerator
from nova_rt.rollout.turn_cache import TurnCache


@dataclass
class Trajectory:
    example_index: int
    """The data row it plays (a row's G episodes are adjacent)."""
    token_ids: list[int] = field(default_factory=list)
    """The whole episode: opening prompt, sampled turns and environment messages."""
    prompt_len: int = 0
    """Tokens of the opening prompt (reset()'s messages and the generation prompt)."""
    sampled_mask: list[bool] = field(default_factory=list)
    """Per token: True where the policy sampled it (the only tokens that carry loss)."""
    logprobs: list[float] = field(default_factory=list)
    """The engine's sampling log-prob of each sampled token, in order."""
    turn_rewards: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    """Ended by max_turns or max_total_tokens, not by the environment."""
    error: str | None = None
    """The environment failure that ended the episode (reward 0, excluded from the loss)."""
    messages: list[dict] = field(default_factory=list)
    """The conversation as text (for logs; the ids above are what trains)."""
    env_time_s: float = 0.0

    @property
    def reward(self) -> float:
        return 0.0 if self.error is not None else sum(self.turn_rewards)

    @property
    def excluded(self) -> bool:
        return self.error is not None

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def response_mask(self) -> list[bool]:
        return self.sampled_mask[self.prompt_len:]

    @property
    def final_reply(self) -> str:
        replies = [m["content"] for m in self.messages if m.get("role") == "assistant"]
        return replies[-1] if replies else ""

    def append(self, ids: list[int], sampled: bool, logprobs: list[float] | None = None) -> None:
        self.token_ids += ids
        self.sampled_mask += [sampled] * len(ids)
        if sampled:
            self.logprobs += list(logprobs)


@dataclass
class MultiTurnRollout:
    trajectories: list[Trajectory]
    metrics: dict
    time_s: float = 0.0


@dataclass
class _Episode:
    trajectory: Trajectory
    env: object = None
    tools: list = field(default_factory=list)
    rendered: str = ""
    """The template's text of the conversation so far, ending with the generation prompt."""
    done: bool = False


class MultiTurnDriver:
    """Plays episodes with a rollout engine (`generate(prompt_ids, group_size, greedy=)` -> Rollout, built with
    max_new_tokens = cfg.max_new_tokens_per_turn), a tokenizer with a chat template, and `env_factory(example)`
    (nova_rt.envs.build_env_factory)."""

    def __init__(self, engine, tokenizer, env_factory, cfg: EnvConfig):
        cfg.validate()
        limit = getattr(engine, "max_new_tokens", cfg.max_new_tokens_per_turn)
        if limit != cfg.max_new_tokens_per_turn:
            raise ValueError(f"the rollout engine samples up to {limit} tokens per call but grpo.env."
                             f"max_new_tokens_per_turn is {cfg.max_new_tokens_per_turn}; build it with that")
        self.engine, self.tok, self.env_factory, self.cfg = engine, tokenizer, env_factory, cfg
        self.chat = ChatRenderer(tokenizer)
        self.hf_engine = isinstance(engine, RolloutGenerator)
        self.turn_cache = TurnCache(engine) if cfg.reuse_kv_cache and self.hf_engine else None
        self.prompt_tokens = self.cached_tokens = 0

    # ------------------------------------------------------------------------------------------- env calls
    def _env_call(self, episode: _Episode, what: str, function, *args):
        """function(*args) with the step timeout, timed; an exception ends the episode (error set, returns None)."""
        t0 = time.perf_counter()
        try:
            return call_with_timeout(function, self.cfg.step_timeout_s, *args)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything; the episode ends, counted
            reason = " ".join(str(exc).split())[:200]
            self._fail(episode, f"{what} {'timed out' if isinstance(exc, TimeoutError) else 'raised'} "
                                f"{type(exc).__name__}: {reason}")
            return None
        finally:
            episode.trajectory.env_time_s += time.perf_counter() - t0

    def _fail(self, episode: _Episode, reason: str) -> None:
        episode.trajectory.error = f"environment '{self.cfg.label}' {reason}"
        episode.done = True

    def _start(self, example: dict, index: int) -> _Episode:
        episode = _Episode(Trajectory(example_index=index))
        episode.env = self._env_call(episode, "constructor", self.env_factory, example)
        if episode.done:
            return episode
        messages = self._env_call(episode, "reset()", episode.env.reset)
        if episode.done:
            return episode
        if not _valid_messages(messages) or not messages:
            self._fail(episode, f"reset() returned {_short(messages)}, not a non-empty list of "
                                "{'role': str, 'content': str} messages")
            return episode
        try:
            episode.tools = make_tools(getattr(episode.env, "tools", None))
        except ValueError as exc:
            self._fail(episode, f"tools: {exc}")
            return episode
        trajectory = episode.trajectory
        trajectory.messages = self.chat.with_tool_text([dict(m) for m in messages], episode.tools)
        episode.rendered = self.chat.render(trajectory.messages, episode.tools, generation_prompt=True)
        trajectory.append(self.chat.encode(episode.rendered), sampled=False)
        trajectory.prompt_len = len(trajectory.token_ids)
        if trajectory.prompt_len >= self.cfg.max_total_tokens:
            trajectory.truncated, episode.done = True, True
        return episode

    # ------------------------------------------------------------------------------------------- turns
    def _env_reply(self, episode: _Episode, text: str) -> tuple[list[dict], float, bool] | None:
        """The environment's answer to a reply: tool results (no reward, not done), or env.step's checked output."""
        trajectory = episode.trajectory
        calls = parse_tool_calls(text) if episode.tools else []
        if calls:
            t0 = time.perf_counter()
            messages, errors = run_tool_calls(calls, episode.tools, self.cfg.tool_timeout_s)
            trajectory.env_time_s += time.perf_counter() - t0
            trajectory.tool_calls += len(calls)
            trajectory.tool_errors += errors
            return messages, 0.0, False
        out = self._env_call(episode, "step()", episode.env.step, text)
        if episode.done:
            return None
        if not (isinstance(out, (tuple, list)) and len(out) == 3 and _valid_messages(out[0])
                and isinstance(out[1], (int, float)) and not isinstance(out[1], bool) and math.isfinite(out[1])):
            self._fail(episode, f"step() returned {_short(out)}, not (messages, finite reward, done)")
            return None
        return list(out[0]), float(out[1]), bool(out[2])

    def _turn(self, episode: _Episode, sampled: list[int], logprobs: list[float], finished: bool) -> None:
        cfg, trajectory = self.cfg, episode.trajectory
        room = cfg.max_total_tokens - len(trajectory.token_ids)
        cut = len(sampled) > room
        if cut:  # the episode's token budget ends inside this turn
            sampled, logprobs, finished = sampled[:room], logprobs[:room], False
        text = self.tok.decode(sampled, skip_special_tokens=True)
        trajectory.append(sampled, sampled=True, logprobs=logprobs)
        trajectory.turns += 1
        trajectory.messages.append({"role": "assistant", "content": text})
        if cut:
            trajectory.truncated, episode.done = True, True
            return
        reply = self._env_reply(episode, text)
        if reply is None:
            return
        messages, reward, done = reply
        trajectory.turn_rewards.append(reward)
        if done or trajectory.turns >= cfg.max_turns:
            trajectory.truncated, episode.done = not done, True
            return
        ids, episode.rendered = self.chat.continuation(trajectory.messages, messages, episode.tools,
                                                       episode.rendered, sampled, finished)
        if len(trajectory.token_ids) + len(ids) >= cfg.max_total_tokens:  # no room left to sample a token
            trajectory.truncated, episode.done = True, True
            return
        trajectory.messages += messages
        trajectory.append(ids, sampled=False)

    def _generate(self, prompts: list[list[int]], group_size: int, greedy: bool, keys: list[int]):
        """The engine's generate, or the turn cache's (keys: the episodes of the responses); counts the prompt
        tokens of every response and those the HF loop did not prefill (a group's copies, cached turns)."""
        if self.turn_cache is not None:
            before = (self.turn_cache.prompt_tokens, self.turn_cache.cached_tokens)
            rollout = self.turn_cache.generate(prompts, keys, group_size, greedy=greedy)
            self.prompt_tokens += self.turn_cache.prompt_tokens - before[0]
            self.cached_tokens += self.turn_cache.cached_tokens - before[1]
            return rollout
        length = sum(len(prompt) for prompt in prompts)
        self.prompt_tokens += group_size * length
        self.cached_tokens += (group_size - 1) * length
        return self.engine.generate(prompts, group_size, greedy=greedy)

    def run(self, examples: list[dict], group_size: int = 1, *, greedy: bool = False) -> MultiTurnRollout:
        """group_size episodes per example (adjacent), played to the end; metrics as in `rollout_metrics`, and with
        the HF loop prompt_tokens / cached_tokens (the prompt tokens of every turn's responses, those not
        prefilled)."""
        t0 = time.perf_counter()
        self.prompt_tokens = self.cached_tokens = 0
        episodes = [self._start(example, index) for index, example in enumerate(examples) for _ in range(group_size)]
        first = True
        while True:
            keys = [index for index, episode in enumerate(episodes) if not episode.done]
            if not keys:
                break
            prompts = [episodes[index].trajectory.token_ids for index in keys]
            if first and len(keys) == len(episodes) and group_size > 1 and all(
                    prompts[i] == prompts[i - i % group_size] for i in range(len(prompts))):
                # the opening turn of groups that share their prompt: the engine prefills each prompt once
                rollout = self._generate(prompts[::group_size], group_size, greedy, keys)
            else:
                rollout = self._generate(prompts, 1, greedy, keys)
            first = False
            for index, ids, logprobs, finished in zip(keys, rollout.response_ids, rollout.logprobs, rollout.finished):
                self._turn(episodes[index], list(ids), list(logprobs), finished)
                if episodes[index].done and self.turn_cache is not None:
                    self.turn_cache.drop(index)
        if self.turn_cache is not None:
            self.turn_cache.clear()
        trajectories = [episode.trajectory for episode in episodes]
        metrics = rollout_metrics(trajectories)
        if self.hf_engine:
            metrics.update(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens)
        return MultiTurnRollout(trajectories, metrics, time.perf_counter() - t0)


def rollout_metrics(trajectories: list[Trajectory]) -> dict:
    """turns_mean, tool_calls_mean, tool_error_frac (failed / attempted calls), env_time_s (summed over episodes),
    episode_truncated_frac, env_error_frac (episodes the environment failed), env_hung_threads; the means are over
    the episodes that did not fail."""
    kept = [t for t in trajectories if not t.excluded] or [Trajectory(example_index=-1)]
    count, calls = len(trajectories), sum(t.tool_calls for t in kept)
    return {"turns_mean": sum(t.turns for t in kept) / len(kept), "tool_calls_mean": calls / len(kept),
            "tool_error_frac": sum(t.tool_errors for t in kept) / max(calls, 1),
            "env_time_s": sum(t.env_time_s for t in trajectories),
            "episode_truncated_frac": sum(t.truncated for t in kept) / len(kept),
            "env_error_frac": sum(t.excluded for t in trajectories) / max(count, 1), "env_hung_threads": hung_threads()}


def check_env_errors(rollout: MultiTurnRollout, cfg: EnvConfig, dp_sum=None) -> None:
    """EnvError (exit 2) naming the environment when more than grpo.env.max_error_frac of the step's episodes failed.
    dp_sum: the backend's in-place float64 all-reduce, so that every data-parallel rank counts all and stops alike."""
    failed = [t for t in rollout.trajectories if t.excluded]
    counts = torch.tensor([float(len(failed)), float(len(rollout.trajectories))], dtype=torch.float64)
    failures, episodes = (dp_sum(counts) if dp_sum is not None else counts).tolist()
    if episodes and failures / episodes > cfg.max_error_frac:
        first = failed[0].error if failed else f"environment '{cfg.label}' failed on other data-parallel ranks"
        raise EnvError(f"{failures:.0f} of {episodes:.0f} episodes of this step failed (more than "
                       f"grpo.env.max_error_frac={cfg.max_error_frac:g}); the first: {first}")


def trajectory_logprobs(model, trajectories: list[Trajectory], *, temperature: float = 1.0) -> list[list[float]]:
    """The policy's log-prob of every sampled token of each trajectory, teacher-forced on the whole trajectory (the
    trainer-side check of the engine's `logprobs`: nova_rt.rollout.base.logprob_gap)."""
    prompts, responses = [], []
    for trajectory in trajectories:
        first = trajectory.sampled_mask.index(True) if any(trajectory.sampled_mask) else len(trajectory.token_ids)
        prompts.append(trajectory.token_ids[:max(first, 1)])
        responses.append(trajectory.token_ids[max(first, 1):])
    scored = policy_token_logprobs(model, prompts, responses, temperature=temperature)
    out = []
    for trajectory, prompt, values in zip(trajectories, prompts, scored):
        mask = trajectory.sampled_mask[len(prompt):]
        out.append([value for value, sampled in zip(values, mask) if sampled])
    return out


def _valid_messages(messages) -> bool:
    return isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in messages)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


__all__ = ["EnvError", "MultiTurnDriver", "MultiTurnRollout", "Trajectory", "check_env_errors",
           "rollout_metrics", "trajectory_logprobs"]
