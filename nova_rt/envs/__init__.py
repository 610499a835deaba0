"""Environments for multi-turn RL rollouts, found by name, and the `grpo.env` config section.

An environment is built once per episode from a data row and talks to the policy in chat messages (the protocol,
`Env`). Built-in types (calculator, guess_number) register themselves with @register_env when their module is
imported; this module imports them on demand, so it depends on none of them. User environments are `{type: user,
path: package.module:Class | path/to/file.py:Class}`, loaded as user rewards are (nova_rt.rewards.user). An env may
also offer tools (an attribute `tools`: functions, see nova_rt.envs.tools); the rollout driver runs them.

EnvConfig is written to become `grpo.env` (validate raises ValueError naming the key); a bad `type`/`path` is a
ConfigError (exit 2). EnvError (a UserError) is what stops a run when too many of a step's episodes failed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from nova_rt.config_values import check_range
from nova_rt.errors import ConfigError, UserError

_ENVS: dict[str, Callable] = {}
_BUILTIN_MODULES = {"calculator": "calculator", "guess_number": "guess_number"}


class EnvError(UserError):
    """Too many episodes of a rollout step failed in their environment (it raised or hung); names the env."""


@runtime_checkable
class Env(Protocol):
    """What a user environment implements (no base class needed):

    __init__(example, **params): example is the episode's data row, params are grpo.env.params;
    reset() -> the opening chat messages [{"role": ..., "content": ...}] (system / user);
    step(reply) -> (next messages, this turn's reward, done): reply is the assistant's text (special tokens removed).
    Optional: `tools`, a list of functions (or {"function": f, "schema": {...}}) the model may call between steps.
    """

    def reset(self) -> list[dict]: ...

    def step(self, reply: str) -> tuple[list[dict], float, bool]: ...


def register_env(name: str):
    """Register an environment class (or factory `(example, **params) -> env`) as type `name`."""

    def deco(cls: Callable) -> Callable:
        _ENVS[name] = cls
        return cls

    return deco


def known_env_types() -> list[str]:
    return sorted(set(_ENVS) | set(_BUILTIN_MODULES) | {"user"})


def get_env_class(name: str) -> Callable:
    """The built-in environment registered as `name` (ConfigError naming grpo.env.type when unknown)."""
    if name not in _ENVS and name in _BUILTIN_MODULES:
        importlib.import_module(f"nova_rt.envs.{_BUILTIN_MODULES[name]}")
    if name not in _ENVS:
        raise ConfigError(f"grpo.env.type: unknown environment {name!r} (known: {', '.join(known_env_types())})")
    return _ENVS[name]


@dataclass(kw_only=True)
class EnvConfig:
    type: str = ""
    """The environment: a built-in (calculator, guess_number) or `user` (with `path`); empty: single-turn rollouts."""
    name: str = ""
    """Its name in metrics and messages (default: the type, or the path of a user environment)."""
    path: str = ""
    """type user: `package.module:Class` or `path/to/file.py:Class` (relative to the config file if not found)."""
    max_turns: int = 4
    """Most assistant turns per episode; an episode that reaches it ends there (truncated)."""
    max_new_tokens_per_turn: int = 256
    """Longest assistant turn in tokens (the rollout engine's max_new_tokens)."""
    max_total_tokens: int = 2048
    """Longest episode (opening prompt + every turn, env messages included); it ends there (truncated)."""
    tool_timeout_s: float = 10.0
    """A tool call running longer becomes an error message to the model (the call is abandoned in its thread)."""
    step_timeout_s: float = 60.0
    """An environment's constructor, reset or step running longer fails its episode (counted, excluded)."""
    max_error_frac: float = 0.25
    """The run stops (exit 2) when more than this share of a step's episodes failed in the environment."""
    params: dict = field(default_factory=dict)
    """Keyword arguments of the environment's constructor (after the data row)."""
    add_rewards: bool = False
    """Also score each episode's final reply with grpo.rewards and add that to the episode's reward (false: the
    environment's turn rewards alone, so a verifier is not counted twice)."""
    reuse_kv_cache: bool = True
    """grpo.rollout.engine hf: each episode keeps its KV cache between turns and the next turn prefills only the
    new tokens (nova_rt.rollout.turn_cache; equal to the full prefill up to float rounding); false: every turn
    prefills the whole conversation. vllm reuses earlier turns through its prefix cache either way."""

    @property
    def enabled(self) -> bool:
        return bool(self.type)

    @property
    def label(self) -> str:
        """How messages and metrics name the environment."""
        return self.name or (self.path if self.type == "user" else self.type)

    def validate(self, key: str = "grpo.env") -> None:
        if not self.enabled:
            if self.path:
                raise ValueError(f"{key}.path: set {key}.type: user to use it (got type empty)")
            return
        if self.type not in known_env_types():
            raise ValueError(f"{key}.type: unknown environment {self.type!r} (known: {', '.join(known_env_types())})")
        if self.type == "user":
            parts = self.path.split(":") if isinstance(self.path, str) else []
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{key}.path: type user needs 'package.module:Class' or 'path/to/file.py:Class', "
                                 f"got {self.path!r}")
        elif self.path:
            raise ValueError(f"{key}.path: only for type user (type is {self.type!r})")
        for name in ("max_turns", "max_new_tokens_per_turn", "max_total_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}.{name}: must be an integer >= 1, got {value!r}")
        if self.max_total_tokens <= self.max_new_tokens_per_turn:
            raise ValueError(f"{key}.max_total_tokens: must exceed max_new_tokens_per_turn "
                             f"({self.max_new_tokens_per_turn}), got {self.max_total_tokens}")
        check_range(f"{key}.tool_timeout_s", self.tool_timeout_s, gt=0)
        check_range(f"{key}.step_timeout_s", self.step_timeout_s, gt=0)
        check_range(f"{key}.max_error_frac", self.max_error_frac, ge=0, le=1)
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise ValueError(f"{key}.params: must be a mapping of keyword arguments, got {self.params!r}")


def build_env_factory(cfg: EnvConfig, *, base_dir: str | None = None) -> Callable[[dict], object]:
    """`factory(example) -> env` for `cfg` (validated here; ConfigError naming the key otherwise). base_dir resolves
    a relative `file.py` of a user environment that is not found as given."""
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not cfg.enabled:
        raise ConfigError("grpo.env.type: no environment configured")
    if cfg.type == "user":
        cls = load_env_class(cfg.path, base_dir)
    else:
        cls = get_env_class(cfg.type)
    params = dict(cfg.params)

    def factory(example: dict):
        return cls(example, **params)

    return factory


def load_env_class(path: str, base_dir: str | None = None) -> Callable:
    """The class `path` names (`module:Class` or `file.py:Class`); ConfigError naming grpo.env.path otherwise."""
    from nova_rt.rewards.user import load_function

    file, sep, rest = path.rpartition(":")
    if sep and file.endswith(".py") and base_dir is not None and not Path(file).is_absolute() \
            and not Path(file).exists() and (Path(base_dir) / file).exists():
        path = f"{Path(base_dir) / file}:{rest}"
    try:
        cls = load_function(path, kind="environment class")
    except ValueError as exc:
        raise ConfigError(f"grpo.env.path: {exc}") from exc
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if inspect.isclass(cls) and missing:
        raise ConfigError(f"grpo.env.path: {path} has no method {' or '.join(missing)} (an environment needs "
                          "__init__(example, **params), reset() -> messages, step(reply) -> (messages, reward, done))")
    return cls
