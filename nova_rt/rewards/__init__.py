"""Reward sources for RL, found by name, and their weighted combination.

A reward source scores a batch of responses: `source(completions: list[str], samples: list[dict]) -> list[float]`,
where samples[i] is the RL prompt record response i answers (nova_rt.data.rl). Sources are built from `grpo.rewards`
entries by type: math, format, reasoning_gym, reward_model, user ("pkg.module:function"); `name` renames one for
metrics (the entries: docs/stages.md#rewards). The total reward is sum_i weight_i * score_i.

Built-in types register themselves with @register_reward when their module is imported; this module imports them
only on demand (by name), so it depends on none of them. An exception inside a source, or scores that are not one
finite number per completion, is a RewardError (a UserError: one line, exit 2) naming the source and the first bad
completion; a bad `grpo.rewards` entry is a ConfigError.
"""

from __future__ import annotations

import importlib
import math as _pymath  # not `math`: the submodule nova_rt.rewards.math takes that name
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nova_rt.errors import ConfigError, RewardError  # noqa: F401 - RewardError is re-exported

_REWARDS: dict[str, Callable[..., Callable]] = {}
_BUILTIN_MODULES = {"math": "math", "format": "format", "reasoning_gym": "gym", "reward_model": "model",
                    "user": "user"}
VERIFIABLE = ("math", "reasoning_gym")
"""Types whose score is correctness (>= 1 means right): the stage's `accuracy` metric comes from them."""


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
        raise ConfigError(f"unknown reward type {name!r} (known: {known})")
    return _REWARDS[name]


def _short(value, limit: int = 40) -> str:
    """repr of a completion or score, cut to `limit` characters of text (…)."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "…")
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass
class RewardSource:
    name: str
    type: str
    weight: float
    fn: Callable
    origin: str = ""
    """`module:function` (or `file.py:function`) of a user source, named in its errors."""

    def _error(self, what: str) -> RewardError:
        """RewardError `reward <source> <what>`: an unnamed user source is its module:function, others their name
        (a named user source adds its function at the end)."""
        if self.origin and self.name == self.type:
            return RewardError(f"reward {self.origin} {what}")
        return RewardError(f"reward '{self.name}' {what}" + (f" (function {self.origin})" if self.origin else ""))

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        n = len(completions)
        try:
            scores = self.fn(completions, samples)
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code may raise anything; name the source
            reason = " ".join(str(exc).split())[:200]
            raise self._error(f"raised {type(exc).__name__}: {reason} (scoring {n} completions)") from exc
        if scores is None or isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__iter__"):
            raise self._error(f"returned {_short(scores)}, not a list of {n} scores")
        scores = list(scores)
        if len(scores) != n:
            raise self._error(f"returned {len(scores)} scores for {n} completions")
        out = []
        for i, s in enumerate(scores):
            try:
                v = float(s)
            except (TypeError, ValueError):
                got = "None" if s is None else f"a non-number {_short(s)}"
                raise self._error(f"returned {got} for completion {i} ({_short(completions[i])})") from None
            if not _pymath.isfinite(v):
                raise self._error(f"returned {v} for completion {i} ({_short(completions[i])})")
            out.append(v)
        return out


class CombinedReward:
    """Weighted sum of reward sources; keeps each source's scores for metrics."""

    def __init__(self, sources: list[RewardSource]):
        if not sources:
            raise ConfigError("at least one reward source is needed (grpo.rewards is empty)")
        names = [s.name for s in sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"grpo.rewards: reward source names must be unique; repeated: {sorted(dup)} "
                              "(set `name:`)")
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
    """Build the combined reward from config entries (see the module docstring); a bad entry is a ConfigError
    naming it. `base_dir` resolves relative paths (a reward model, a user function's .py file) not found as given."""
    sources = []
    for i, spec in enumerate(specs):
        where = f"grpo.rewards[{i}]"
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {spec!r}")
        spec = dict(spec)
        rtype = spec.pop("type")
        name = spec.pop("name", rtype)
        weight = spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{where}.weight: expected a number, got {weight!r}")
        origin = ""
        if rtype == "user" and isinstance(spec.get("function"), str):
            origin = spec["function"]
            spec["function"] = _resolve_function_file(origin, base_dir)
        try:
            factory = get_reward_factory(rtype)
            if rtype == "reward_model" and base_dir is not None:
                spec.setdefault("base_dir", base_dir)
            fn = factory(**spec)
        except TypeError as exc:
            raise ConfigError(f"{where} (type {rtype}): bad options {sorted(spec)}: {exc}") from None
        except (ValueError, ImportError, OSError) as exc:
            raise ConfigError(f"{where} (type {rtype}, name '{name}'): {exc}") from exc
        sources.append(RewardSource(name=name, type=rtype, weight=float(weight), fn=fn, origin=origin))
    return CombinedReward(sources)


def _resolve_function_file(function: str, base_dir: str | None) -> str:
    """`file.py:function` with a relative file that is not found as given, but is under base_dir: that path."""
    file, sep, rest = function.rpartition(":")
    if not sep or not file.endswith(".py") or base_dir is None or Path(file).is_absolute() or Path(file).exists():
        return function
    candidate = Path(base_dir) / file
    return f"{candidate}:{rest}" if candidate.exists() else function
