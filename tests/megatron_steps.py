"""run_megatron_steps for the megatron loop tests (tests/test_reliability_megatron.py, tests/spine/test_lr_schedule.py):
the supervised step loop over a bare (stand-in) MegatronTrainer, as the stages run it through MegatronPolicy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nova_rt.backends.megatron import MegatronPolicy
from nova_rt.config import Config


def run_megatron_steps(cfg: Config, backend, telemetry, run_dir: Path, start: int,
                       micro_batches_for: Callable[[int], list[dict]], loss_fn: Callable | None = None,
                       extra_metrics: Callable[[int, dict], dict] | None = None) -> None:
    """base.run_steps over a bare MegatronTrainer resumed at step `start`; with checkpoint.save_final, a run that
    ended on a non-finite step is a NonFiniteError here (no final model from it)."""
    from nova_rt.backends.base import run_steps

    policy = MegatronPolicy(cfg, backend, run_dir, start=start)
    run_steps(cfg, policy, telemetry, micro_batches_for, loss_fn, extra_metrics)
    if cfg.checkpoint.save_final:
        policy.guard.refuse_model(cfg.train.max_steps)
