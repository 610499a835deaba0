"""Reward sources for RL, found by name, and their weighted combination.

A reward source scores a batch of responses: `source(completions: list[str], samples: list[dict]) -> list[float]`,
where samples[i] is the RL prompt record response i answers (see nova_rt.data.rl: "answer", "category",
"messages", "prefill", "gym" ...). Sources are built from config entries (`grpo.rewards`):

    - {type: math, weight: 1.0}                       verifier: extracted final answer == sample["answer"]
    - {type: format, weight: 0.1, pattern: "..."}     regex / answer-format check
    - {type: reasoning_gym, weight: 1.0}              the task's own reasoning-gym scorer (score_answer)
    - {type: reward_model, path: runs/rm/final}       an AutoModelForSequenceClassification directory
    - {type: user, function: "pkg.module:function"}   any callable with the signature above
    - {name: ...} optionally renames an entry for metrics (default: its type)

Built-in types live in the modules of this package and register themselves with @register_reward when imported;
this module imports them only on demand (by name), so it depends on none of them. The total reward is
sum_i weight_i * score_i. Any failure inside a source is re-raised as a RewardError naming the source.
"""

from __future__ import annotations

import importlib
import math as _pymath  # not `math`: the submodule nova_rt.rewards.math takes that name
from collections.abc import Callable
from dataclasses import dataclass

_REWARDS: dict[str, Callable[..., Callable]] = {}
_BUILTIN_MODULES = {"math": "math", "format": "format", "reasoning_gym": "gym", "reward_model": "model",
                    "user": "user"}
VERIFIABLE = ("math", "reasoning_gym")
"""Types whose score is correctness (>= 1 means right): the stage's `accuracy` metric comes from them."""


class RewardError(RuntimeError):
    """A reward source failed or returned bad scores; the message names the source."""


def register_reward(name: str):
    """Register `factory(**kwargs) -> source` as reward type `name`."""

    def deco(factory: Callable[..., Callable]) -> Callable[..., Callable]:
        _REWARDS[name] = factory
        return factory

    return deco


def get_reward_factory(name: str) -> Callable[..., Callable]:
    if name not in _REWARDS and name in _BUILTIN_MODULES:
        importlib.import_module(f"nova_rt.rewards.{_BUILTIN_MODULES[name]}")
    if name not in _REWARDS:
        known = ", ".join(sorted(set(_REWARDS) | set(_BUILTIN_MODULES)))
        raise ValueError(f"unknown reward type {name!r} (known: {known})")
    return _REWARDS[name]


@dataclass
class RewardSource:
    name: str
    type: str
    weight: float
    fn: Callable

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        try:
            scores = self.fn(completions, samples)
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code may raise anything; name the source
            raise RewardError(f"reward source '{self.name}' (type {self.type}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        scores = list(scores) if scores is not None else None
        if scores is None or len(scores) != len(completions):
            raise RewardError(f"reward source '{self.name}' returned {None if scores is None else len(scores)} "
                              f"scores for {len(completions)} completions")
        out = []
        for i, s in enumerate(scores):
            try:
                v = float(s)
            except (TypeError, ValueError):
                raise RewardError(f"reward source '{self.name}' returned a non-number for completion {i}: "
                                  f"{s!r}") from None
            if not _pymath.isfinite(v):
                raise RewardError(f"reward source '{self.name}' returned {v} for completion {i}")
            out.append(v)
        return out


class CombinedReward:
    """Weighted sum of reward sources; keeps each source's scores for metrics."""

    def __init__(self, sources: list[RewardSource]):
        if not sources:
            raise ValueError("at least one reward source is needed (grpo.rewards is empty)")
        names = [s.name for s in sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"reward source names must be unique; repeated: {sorted(dup)} (set `name:`)")
        self.sources = sources

    def __call__(self, completions: list[str], samples: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        """(total reward per completion, {source name: its raw scores})."""
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
        per = {s.name: s(completions, samples) for s in self.sources}
        total = [sum(s.weight * per[s.name][i] for s in self.sources) for i in range(len(completions))]
        return total, per

    @property
    def verifiable(self) -> bool:
        """True when some source is a verifier, so correctness (accuracy) is defined."""
        return any(s.type in VERIFIABLE for s in self.sources)

    def correctness(self, per_source: dict[str, list[float]]) -> list[float] | None:
        """1.0/0.0 per completion from the first verifiable source (score >= 1 is correct), or None."""
        for s in self.sources:
            if s.type in VERIFIABLE:
                return [1.0 if v >= 1.0 - 1e-9 else 0.0 for v in per_source[s.name]]
        return None


def build_reward(specs: list[dict], *, base_dir: str | None = None) -> CombinedReward:
    """Build the combined reward from config entries (see the module docstring). `base_dir` resolves paths."""
    sources = []
    for i, spec in enumerate(specs):
        where = f"grpo.rewards[{i}]"
        if not isinstance(spec, dict) or "type" not in spec:
            raise ValueError(f"{where}: expected a mapping with a 'type' key, got {spec!r}")
        spec = dict(spec)
        rtype = spec.pop("type")
        name = spec.pop("name", rtype)
        weight = spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{where}.weight: expected a number, got {weight!r}")
        try:
            factory = get_reward_factory(rtype)
            if rtype == "reward_model" and base_dir is not None:
                spec.setdefault("base_dir", base_dir)
            fn = factory(**spec)
        except TypeError as exc:
            raise ValueError(f"{where} (type {rtype}): bad options {sorted(spec)}: {exc}") from None
        except (ValueError, ImportError, OSError) as exc:
            raise ValueError(f"{where} (type {rtype}, name '{name}'): {exc}") from exc
        sources.append(RewardSource(name=name, type=rtype, weight=float(weight), fn=fn))
    return CombinedReward(sources)
