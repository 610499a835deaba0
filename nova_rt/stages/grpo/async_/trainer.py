"""The trainers of asynchronous GRPO: GRPORun, scoped to the trainers' process group, whose collect() sends the
current weights (trainer 0, without waiting) and receives the step's batch from the rollout ranks instead of
sampling. Everything after collect (advantages, micro-batches, the IS correction with the engine's log-probs as
behaviour and the trainer's forward as proximal, optimizer steps, checkpoints) is the colocated loop's.

Eval runs on the trainers with their own model every grpo.eval.every rollout steps, as in the colocated loop; the
category weights it re-weights to go to the rollout ranks with the next weights, so they apply from the batch that
version samples (with max_staleness 0: the same batch as in the colocated loop). A checkpoint holds the sampler
state after the last trained batch (the rollout ranks' stream, the trainers' category weights) and every rollout
rank's engine state, so a resumed run draws the same prompts as an uninterrupted one."""

from __future__ import annotations

import contextlib
import time
import zlib

import numpy as np
import torch

from nova_rt.config import Config
from nova_rt.distributed import broadcast_object
from nova_rt.errors import UserError
from nova_rt.stages.grpo.async_.wire import (
    ERROR,
    Channels,
    PeerLost,
    WeightSender,
    decode_groups,
    recv_batch,
    talking_to,
)
from nova_rt.stages.grpo.batches import RolloutGroup
from nova_rt.stages.grpo.run import GRPORun


class RolloutRankFailed(RuntimeError):
    """A rollout rank sent the error it stopped with (not a user error)."""


class RolloutRankUserError(UserError):
    """A rollout rank sent the user error it stopped with (exit 2)."""


class AsyncGRPORun(GRPORun):
    def __init__(self, cfg: Config, channels: Channels):
        super().__init__(cfg)
        self.channels, self.start = channels, None
        self.dp_group = channels.trainer_group  # agg_totals' group (None would be the whole world)
        self.total = cfg.train.max_steps // self.grpo.steps_per_rollout
        self.rollout_states: list[list[int]] | None = None  # each rollout rank's engine state after the last batch
        self.sender = WeightSender(channels, list(self.hf.parameters()), self.grpo.rollout.sync_bucket_mb) \
            if self.info.is_main else None

    def restore(self, extra: dict | None) -> None:
        super().restore(extra)
        if extra and "grpo" in extra:
            self.rollout_states = [state.tolist() for state in extra["grpo"].get("rollout_ranks", [])] or None

    def state(self) -> dict:
        out = super().state()
        if self.rollout_states is not None:
            out["grpo"]["rollout"] = {"rng": torch.tensor(self.rollout_states[0], dtype=torch.uint8)}
            out["grpo"]["rollout_ranks"] = [torch.tensor(state, dtype=torch.uint8) for state in self.rollout_states]
        return out

    def collect(self) -> tuple[list[RolloutGroup], dict]:
        batch = self.trainer.step // self.grpo.steps_per_rollout
        staleness = self.grpo.async_rollout.max_staleness
        sync_s = 0.0
        if self.sender is not None and (self.start is None or batch <= self.total - 1 - staleness):
            began = time.perf_counter()
            extra = {"weights": self.sampler.weights}
            if self.start is None:
                extra.update(start=batch, sampler=self.sampler.state_dict())
                if self.rollout_states is not None and len(self.rollout_states) == len(self.channels.rollouts):
                    extra["generators"] = self.rollout_states
            with talking_to("a rollout rank"):
                self.sender.release(batch - staleness)
                self.sender.send(batch, extra)
            sync_s = time.perf_counter() - began
        self.start = batch if self.start is None else self.start
        began = time.perf_counter()
        shares = self._receive(batch) if self.info.is_main else None
        if self.info.distributed:  # trainer 0 hands each trainer its share
            with talking_to("trainer rank 0"):
                shares = broadcast_object(shares)
        groups, metrics, sampler, generators = shares[self.info.rank]
        weights = dict(self.sampler.weights)  # the trainers' category weights; the stream is the rollout ranks'
        self.sampler.load_state_dict(sampler)
        self.sampler.weights = weights
        self.rollout_states = generators
        metrics.update(rollout_wait_s=time.perf_counter() - began, weight_sync_s=sync_s)
        return groups, metrics

    def _receive(self, batch: int) -> list:
        """The batch from every rollout rank, split over the trainers: [(groups, metrics, sampler, engines)]."""
        groups, infos, versions = [], [], []
        for src in self.channels.rollouts:
            with talking_to(f"rollout rank {src}"):
                kind, number, version, ints, floats, info = recv_batch(self.channels, src)
            if kind == ERROR:
                error = RolloutRankUserError if info["user_error"] else RolloutRankFailed
                raise error(f"rollout rank {src}: {info['error']}")
            if number != batch:
                raise RuntimeError(f"rollout rank {src} sent batch {number}, trainer 0 expected {batch}")
            groups += decode_groups(ints, floats)
            infos.append(info)
            versions.append(version)
        metrics = dict(infos[0]["metrics"])
        metrics.update(staleness_mean=float(np.mean([batch - v for v in versions])),
                       staleness_max=float(max(batch - v for v in versions)),
                       producer_wait_s=max(info["producer_wait_s"] for info in infos),
                       rollout_gen_s=max(info["rollout_gen_s"] for info in infos),
                       prompt_crc32=float(zlib.crc32(repr([info["prompt_crc32"] for info in infos]).encode())))
        generators = [info["generator"] for info in infos]
        parts = np.array_split(np.arange(len(groups)), len(self.channels.trainers))
        return [([groups[i] for i in part], metrics, infos[0]["sampler"], generators) for part in parts]

    def run(self) -> dict:
        try:
            out = super().run()
        except Exception as exc:
            if self.sender is not None and not isinstance(exc, (PeerLost, RolloutRankFailed, RolloutRankUserError)):
                # the rollout ranks stop on it when they next receive weights
                with contextlib.suppress(RuntimeError):
                    self.sender.send(-1, {"error": f"{type(exc).__name__}: {exc}",
                                          "user_error": isinstance(exc, UserError)}, stop=True)
            raise
        if self.sender is not None:
            with talking_to("a rollout rank"):
                self.sender.drain()
        return out
