"""Stage registry. Each stage lives in nova_rt/stages/<name>.py, registers `run(cfg)` with @register_stage, and
may register a config section of the same name. Stages are imported on demand, so importing this package is
cheap and no two stage modules import each other at import time."""

from __future__ import annotations

import importlib
from collections.abc import Callable

_STAGES: dict[str, Callable] = {}
KNOWN_STAGES = ("sft", "rm", "dpo", "grpo", "pas", "merge", "pipeline")


def register_stage(name: str):
    def deco(fn: Callable) -> Callable:
        _STAGES[name] = fn
        return fn

    return deco


def get_stage(name: str) -> Callable:
    """The `run(cfg)` function of stage `name`."""
    if name not in _STAGES:
        try:
            importlib.import_module(f"nova_rt.stages.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nova_rt.stages.{name}":
                raise
    if name not in _STAGES:
        raise ValueError(f"unknown run.stage '{name}' (known: {', '.join(KNOWN_STAGES)})")
    return _STAGES[name]
