"""A rollout rank of asynchronous GRPO: builds only what sampling needs (the HF policy copy, tokenizer, HF rollout
engine, reward, prompt sampler; no optimizer, reference or checkpoint), receives everything else from trainer 0
(weights, the start step, the sampler and engine states of a resume, category weights after each eval) and sends
each finished batch back. Batch b is sampled with weights version max(start, b - max_staleness): it waits for that
version (producer_wait_s) and never uses a newer one, so a run is the same whatever the timing. Dynamic sampling
counts over the rollout ranks, each of which draws every prompt of a step and keeps its share (as the colocated
loop's data-parallel ranks do); rollout rank i seeds its engine as data-parallel rank i would."""

from __future__ import annotations

import logging
import time
import zlib

import torch

from nova_rt.config import Config
from nova_rt.distributed import DistInfo
from nova_rt.stages.grpo.async_.wire import BATCH, Channels, Outbox, WeightReceiver, encode_groups, talking_to
from nova_rt.stages.grpo.run import GRPORun

log = logging.getLogger("nova_rt.grpo")


class TrainerStopped(RuntimeError):
    """Trainer 0 stopped on an error and said so (user: a user error, exit 2)."""

    def __init__(self, message: str, user: bool):
        super().__init__(message)
        self.user = user


class RolloutWorker(GRPORun):
    """GRPORun's sampling half (its _collect, _sample_groups and score run unchanged on these attributes)."""

    def __init__(self, cfg: Config, channels: Channels, info: DistInfo):  # not GRPORun.__init__: no trainer here
        from nova_rt.backends.hf import load_policy
        from nova_rt.data.rl import PromptEncoder
        from nova_rt.models.loading import to_dtype
        from nova_rt.rewards import build_reward
        from nova_rt.rollout.engine import Sampling, build_rollout_engine

        self.cfg, self.grpo, self.info, self.channels = cfg, cfg.grpo, info, channels
        self.dp_rank, self.dp_size = channels.rollout_index, len(channels.rollouts)
        self.version = -1
        self.hf, self.tok = load_policy(cfg, trainable=True)  # the trainer's dtype: its weights copy over exactly
        self.hf.requires_grad_(False)
        sampling = self.grpo.sampling
        self.generator = build_rollout_engine(
            self.grpo.rollout, self.hf, self.tok,
            Sampling(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                     top_k=sampling.top_k, seed=cfg.run.seed * 1000 + self.dp_rank, batch_size=sampling.rollout_batch),
            policy_version=lambda: self.version, backend="hf", dtype=to_dtype(cfg.model.dtype))
        self.reward = build_reward(self.grpo.rewards, base_dir=cfg.config_dir)
        self._load_prompts()
        self.prompt_ids = PromptEncoder(self.tok, self.grpo.data.pas_model)
        params = list(self.hf.parameters())
        self.receiver = WeightReceiver(channels, params, self.grpo.rollout.sync_bucket_mb)
        self.outbox = Outbox(channels)

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        with talking_to("another rollout rank"):
            torch.distributed.all_reduce(t, group=self.channels.rollout_group)
        return t

    def _next_version(self) -> dict:
        with talking_to("trainer rank 0"):
            version, extra, stop = self.receiver.receive()
        if stop:  # trainer 0 stopped on an error (its line names it)
            raise TrainerStopped(f"trainer rank 0 stopped: {extra['error']}", extra["user_error"])
        self.version = version
        if "sampler" in extra:
            self.sampler.load_state_dict(extra["sampler"])
        if "generators" in extra:
            state = extra["generators"][self.dp_rank]
            self.generator.load_state_dict({"rng": torch.tensor(state, dtype=torch.uint8)})
        self.sampler.weights = dict(extra["weights"])
        with talking_to("trainer rank 0"):
            self.outbox.release(version)  # trainer 0 received every batch before this version
        return extra

    def produce(self) -> None:
        """Every batch from the start step trainer 0 names to train.max_steps' last rollout step."""
        cfg = self.cfg
        total = cfg.train.max_steps // self.grpo.steps_per_rollout
        start = self._next_version()["start"]
        for batch in range(start, total):
            waited = time.perf_counter()
            while self.version < max(start, batch - self.grpo.async_rollout.max_staleness):
                self._next_version()
            waited = time.perf_counter() - waited
            began = time.perf_counter()
            groups, metrics = self._collect()
            ints, floats = encode_groups(groups)
            info = {"metrics": metrics, "sampler": self.sampler.state_dict(),
                    "generator": self.generator.state_dict()["rng"].tolist(), "producer_wait_s": waited,
                    "rollout_gen_s": time.perf_counter() - began,
                    "prompt_crc32": zlib.crc32(repr([group.prompt for group in groups]).encode())}
            with talking_to("trainer rank 0"):
                self.outbox.send(BATCH, batch, self.version, ints, floats, info)
        with talking_to("trainer rank 0"):
            self.outbox.drain()
