"""Registry of merge methods: `@register_merge("ties", ...)` on a per-tensor merge function.

A method declares what the config may set (its global and per-model parameters, with types, defaults and allowed
values) and how many inputs it takes, so the config loader can reject anything the method would ignore. This module
imports no method: nova_rt/merge/methods.py fills the registry when imported, and the modules that look methods up
import it first (nova_rt.merge.config, and the package `nova_rt.merge` when `get_merge` / `available_merges` are
taken from it), so the dependencies run one way: registry <- methods <- config <- engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

REQUIRED = object()  # default of a parameter that the config must set


@dataclass(frozen=True)
class ParamSpec:
    """One config parameter of a method: scalar type (float, int or bool), default, and optionally the values
    accepted."""

    type: type
    default: Any = REQUIRED
    choices: tuple | None = None
    why: str = ""  # shown when a value outside `choices` is rejected

    def validate(self, name: str, value: Any, where: str) -> Any:
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: parameter {name!r} must be true or false, got {value!r}")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: parameter {name!r} must be a number, got {value!r}")
            value = float(value)
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: parameter {name!r} must be an integer, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where}: parameter {name!r} = {value!r} is not supported ({self.why})")
        return value


@dataclass
class TensorMerge:
    """The inputs of one output tensor, already on the merge device, with parameters resolved for this tensor.

    `tensors` are the non-base models in config order (for methods without a base: all models); `model_params[i]`
    holds the per-model parameters of tensors[i]; `params` the global ones. `out`, when set, is where the result
    must be written (out_dtype, the inputs' shape; the streaming merge passes the tensor's place in the output file).
    """

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    out_dtype: torch.dtype
    impl: str = "auto"
    seed: int = 0
    out: torch.Tensor | None = None


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: the per-tensor function plus what its config may contain."""

    name: str
    fn: Callable[[TensorMerge], torch.Tensor]
    needs_base: bool
    min_models: int  # non-base models when needs_base, else all models
    max_models: int | None = None
    global_params: dict[str, ParamSpec] = field(default_factory=dict)
    model_params: dict[str, ParamSpec] = field(default_factory=dict)
    reference_url: str = ""
    optional_base: bool = False  # needs_base, but a config without base_model merges the models themselves
    description: str = ""  # one line for `nova-rt merge --help`

    def __call__(self, merge: TensorMerge) -> torch.Tensor:
        return self.fn(merge)


_REGISTRY: dict[str, MergeMethod] = {}


def register_merge(name: str, *, needs_base: bool, min_models: int, max_models: int | None = None,
                   global_params: dict[str, ParamSpec] | None = None,
                   model_params: dict[str, ParamSpec] | None = None,
                   reference_url: str = "", optional_base: bool = False,
                   description: str = "") -> Callable[[Callable], Callable]:
    """Decorator registering a per-tensor merge function under `name` (duplicate names are an error)."""

    def wrap(fn: Callable[[TensorMerge], torch.Tensor]) -> Callable[[TensorMerge], torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = MergeMethod(name=name, fn=fn, needs_base=needs_base, min_models=min_models,
                                      max_models=max_models, global_params=dict(global_params or {}),
                                      model_params=dict(model_params or {}), reference_url=reference_url,
                                      optional_base=optional_base, description=description)
        return fn

    return wrap


def get_merge(name: str) -> MergeMethod:
    """The method registered as `name`; an error lists the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge_method {name!r}; supported: {', '.join(sorted(_REGISTRY))}") from None


def available_merges() -> list[str]:
    return sorted(_REGISTRY)


def describe_methods() -> str:
    """One block per registered method: name, description, and its parameters with defaults (for --help)."""
    lines = ["merge methods (parameters: global, then per model; = default, no default: required):"]
    for name in available_merges():
        m = _REGISTRY[name]
        base = "optional base_model" if m.optional_base else "base_model" if m.needs_base else "no base_model"
        lines.append(f"  {name}: {m.description} [{base}]")
        if not m.global_params and not m.model_params:
            lines.append("      no parameters")
        for scope, params in (("global", m.global_params), ("per model", m.model_params)):
            shown = [k if spec.default is REQUIRED else f"{k}={str(spec.default).lower()}"
                     for k, spec in params.items()]
            if shown:
                lines.append(f"      {scope}: {', '.join(shown)}")
    return "\n".join(lines)
