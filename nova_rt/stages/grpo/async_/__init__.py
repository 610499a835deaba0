"""Asynchronous GRPO (grpo.async_rollout.ranks > 0; docs/async.md): the last N ranks of the torchrun world only
sample (producer.RolloutWorker), the first W - N only train (trainer.AsyncGRPORun, the colocated loop scoped to
their process group), and batch b is sampled with the weights of rollout step b - max_staleness. The groups and
messages are in wire. This module registers the grpo stage: ranks 0 runs the colocated GRPORun unchanged.

Faults: a rollout rank's error goes to trainer 0 before the rank exits, and every rank exits with one line naming
the rank (exit 2 for a user error, else 1); a rank that dies closes its connections, and its peers' blocked sends
and receives raise, so the others exit too (under torchrun, which also stops the rest once one rank has exited)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from nova_rt.config import Config
from nova_rt.distributed import DistInfo, init_distributed, scope
from nova_rt.errors import ConfigError, UserError
from nova_rt.stages import register_stage
from nova_rt.stages.grpo.async_.wire import ERROR, Channels, Outbox, PeerLost, make_channels
from nova_rt.stages.grpo.run import GRPORun

MEGATRON_REASON = ("megatron-core's parallel_state builds its groups over every rank of the default group, so the "
                   "rollout ranks would be counted as data-parallel ranks")


@register_stage("grpo")
def run(cfg: Config) -> dict:
    if cfg.grpo.async_rollout.ranks == 0:
        return GRPORun(cfg).run()
    return run_async(cfg)


def check_async(cfg: Config, world: int) -> None:
    """The settings asynchronous GRPO refuses, as ConfigErrors naming the key (every rank raises the same)."""
    ranks = cfg.grpo.async_rollout.ranks
    key = f"grpo.async_rollout.ranks={ranks}"
    if ranks >= world:
        raise ConfigError(f"{key} leaves no trainer: the torchrun world has {world} rank(s) (WORLD_SIZE); launch "
                          f"more (torchrun --nproc_per_node={ranks + 1}) or set grpo.async_rollout.ranks=0")
    refusals = [
        (cfg.parallel.backend != "hf", f"parallel.backend={cfg.parallel.backend}: {MEGATRON_REASON}; use "
                                       "parallel.backend=hf"),
        (cfg.grpo.rollout.engine != "hf", "grpo.rollout.engine=vllm: vLLM on dedicated rollout ranks is not built "
                                          "yet; use engine: hf"),
        (cfg.grpo.env.enabled, "grpo.env: multi-turn episodes on dedicated rollout ranks are not built yet"),
        (cfg.lora.rank > 0, "lora.rank > 0: LoRA on dedicated rollout ranks is not built yet"),
        (cfg.grpo.sampling.prompts_per_step % ranks != 0,
         f"grpo.sampling.prompts_per_step={cfg.grpo.sampling.prompts_per_step} must divide by the rollout ranks"),
    ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"{key}: {why}")


def run_async(cfg: Config) -> dict | None:
    from nova_rt.stages.grpo.async_.trainer import AsyncGRPORun

    check_async(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed()
    channels = make_channels(info.rank, info.world_size, cfg.grpo.async_rollout.ranks, info.device)
    if channels.is_rollout:
        return _rollout_rank(cfg, channels, info)
    scope(DistInfo(info.rank, len(channels.trainers), info.local_rank, info.device), channels.trainer_group)
    try:
        return AsyncGRPORun(cfg, channels).run()
    except BaseException as exc:  # noqa: BLE001 - reported, then the process ends (see _exit)
        _exit(exc, f"trainer rank {info.rank}")
    finally:
        scope(None)


def _rollout_rank(cfg: Config, channels: Channels, info: DistInfo) -> None:
    from nova_rt.stages.common import seed_everything
    from nova_rt.stages.grpo.async_.producer import RolloutWorker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.run.seed + info.rank)
    try:
        RolloutWorker(cfg, channels, info).produce()
    except BaseException as exc:  # noqa: BLE001 - told to trainer 0 (unless it came from there), reported
        if not isinstance(exc, (PeerLost, KeyboardInterrupt, SystemExit)) and not hasattr(exc, "user"):
            _tell_trainers(channels, f"{type(exc).__name__}: {exc}", _is_user_error(exc))
        if _is_user_error(exc) or getattr(exc, "user", False):
            exc = UserError(f"rollout rank {info.rank}: {exc}")
        _exit(exc, f"rollout rank {info.rank}")


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (UserError, FileNotFoundError))


def _exit(exc: BaseException, who: str) -> NoReturn:
    """Report `exc` as nova_rt.train does (a user error: its line, exit 2; a peer's failure: one line naming `who`,
    exit 1; a bug: the traceback, exit 1), then end the process at once: weight or batch sends that a peer will
    never receive would hold the process group's destructor forever."""
    from nova_rt.errors import debug_enabled
    from nova_rt.stages.grpo.async_.trainer import RolloutRankFailed
    from nova_rt.train import report_user_error

    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else 1
    elif _is_user_error(exc) and not debug_enabled():
        code = report_user_error(exc)
    elif isinstance(exc, (PeerLost, RolloutRankFailed)) or hasattr(exc, "user"):
        print(f"nova_rt: error: {who}: {exc}", file=sys.stderr)
        code = 1
    else:
        traceback.print_exception(exc)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _tell_trainers(channels: Channels, error: str, user: bool, wait_s: float = 60.0) -> None:
    """Send the error to trainer 0 and wait (at most wait_s) until it has exited on it, so that its line names this
    rank's error before torchrun stops the rest; SIGTERM (torchrun's) is ignored meanwhile."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(RuntimeError):
        outbox = Outbox(channels)
        outbox.send(ERROR, -1, -1, [], [], {"error": error, "user_error": user})
        for work in outbox.pending[0][1]:
            work.wait(timedelta(seconds=wait_s))
        never = torch.zeros(1, dtype=torch.int64, device=channels.device)
        dist.irecv(never, src=0, group=channels.data_group).wait(timedelta(seconds=wait_s))
