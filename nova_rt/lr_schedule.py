"""The learning-rate schedule, the only place it is written: linear warmup, then cosine / linear decay to
optim.min_lr_ratio at train.max_steps (or constant). Every loop applies it through here: the HF Trainer as a
LambdaLR multiplier (`lr_schedule`), the megatron loops (supervised stages and GRPO's policy) by setting
`lr_at(...)` before each optimizer step. tests/spine/test_lr_schedule.py pins its values bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from nova_rt.config import OptimConfig


def lr_lambda(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"optim.scheduler must be cosine, linear or constant, got {kind!r}")


def lr_schedule(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """step -> multiplier of optim.lr, for a run of `total_steps` optimizer steps (train.max_steps)."""
    return partial(lr_lambda, warmup=optim.warmup_steps, total=total_steps, kind=optim.scheduler,
                   min_ratio=optim.min_lr_ratio)


def lr_at(optim: OptimConfig, total_steps: int, step: int) -> float:
    """The lr of optimizer step `step` (0-based): optim.lr times the multiplier, as LambdaLR computes it."""
    return optim.lr * lr_schedule(optim, total_steps)(step)
