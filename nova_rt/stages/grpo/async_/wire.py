"""What asynchronous GRPO's ranks send each other, as tensors over torch.distributed (gloo on CPU; the same calls
on NCCL, with the tensors on the GPU): no sockets, files or pickles of its own.

Process groups, created by every rank in the same order (make_channels): the trainers (the first W - N ranks: DDP
and every training collective), the rollout ranks (the last N: dynamic sampling's counts), and two groups of
{trainer 0} + the rollout ranks, one per direction so that the two never share a queue: `sync` carries weights
(WeightSender / WeightReceiver: broadcasts of a header [version, buckets, stop, extra bytes], a JSON extra, then
flat buckets of about grpo.rollout.sync_bucket_mb), `data` carries finished batches and errors (send_batch /
recv_batch: point-to-point, a header [kind, batch, version, ints, floats, JSON bytes] then the three payloads).
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nova_rt.stages.grpo.batches import RolloutGroup

BATCH, ERROR = 0, 1
"""Kinds of a data-group message."""


class PeerLost(RuntimeError):
    """A peer stopped answering (its process ended): torch.distributed raised on the closed connection."""


@contextlib.contextmanager
def talking_to(peer: str):
    """Turn torch.distributed's error on a closed connection into PeerLost naming `peer`."""
    try:
        yield
    except PeerLost:
        raise
    except RuntimeError as exc:  # gloo / NCCL: DistBackendError and friends
        text = str(exc).strip()
        raise PeerLost(f"{peer} stopped answering ({text.splitlines()[0] if text else type(exc).__name__})") \
            from exc


@dataclass
class Channels:
    """This rank's place in the topology and the four process groups."""

    rank: int
    trainers: list[int]
    rollouts: list[int]
    trainer_group: object
    rollout_group: object
    sync_group: object
    data_group: object
    device: torch.device

    @property
    def is_rollout(self) -> bool:
        return self.rank in self.rollouts

    @property
    def rollout_index(self) -> int:
        return self.rank - self.rollouts[0]


def make_channels(rank: int, world: int, ranks: int, device: torch.device) -> Channels:
    """The groups of a world whose last `ranks` ranks sample (a collective: every rank calls it)."""
    trainers, rollouts = list(range(world - ranks)), list(range(world - ranks, world))
    trainer_group, rollout_group = dist.new_group(trainers), dist.new_group(rollouts)
    sync_group, data_group = dist.new_group([0, *rollouts]), dist.new_group([0, *rollouts])
    return Channels(rank, trainers, rollouts, trainer_group, rollout_group, sync_group, data_group, device)


def _json_tensor(obj, device) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)


def _from_json(t: torch.Tensor):
    return json.loads(bytes(t.cpu().numpy().tobytes()).decode())


def _buckets(params: list[torch.Tensor], bucket_mb: int) -> list[list[int]]:
    """Parameter indices in buckets of one dtype and about bucket_mb MB (the same on both sides: same model)."""
    out, size, limit = [], 0, bucket_mb * 2**20
    for index, param in enumerate(params):
        nbytes = param.numel() * param.element_size()
        if out and size + nbytes <= limit and params[out[-1][-1]].dtype == param.dtype:
            out[-1].append(index)
            size += nbytes
        else:
            out.append([index])
            size = nbytes
    return out


class WeightSender:
    """Trainer 0: broadcasts a version of the weights (and a JSON extra) to the rollout ranks without waiting for
    them; a version's copies are kept until its broadcast is done (at most max_staleness + 1 versions)."""

    def __init__(self, channels: Channels, params: list[torch.Tensor], bucket_mb: int):
        self.channels, self.params, self.buckets = channels, params, _buckets(params, bucket_mb)
        self.pending: deque = deque()  # (version, works, tensors)

    @torch.no_grad()
    def send(self, version: int, extra: dict, stop: bool = False) -> None:
        group, device = self.channels.sync_group, self.channels.device
        payload = _json_tensor(extra, device)
        header = torch.tensor([version, 0 if stop else len(self.buckets), int(stop), payload.numel()],
                              dtype=torch.int64, device=device)
        tensors = [header, payload]
        if not stop:
            tensors += [torch.cat([self.params[i].detach().reshape(-1) for i in bucket]).to(device)
                        for bucket in self.buckets]
        works = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
        self.pending.append((version, works, tensors))

    def release(self, done_before: int) -> None:
        """Wait for (and free) the versions < done_before: every rollout rank has received them."""
        while self.pending and self.pending[0][0] < done_before:
            for work in self.pending.popleft()[1]:
                work.wait()

    def drain(self) -> None:
        self.release(float("inf"))


class WeightReceiver:
    """A rollout rank: receives the next version into its copy of the model."""

    def __init__(self, channels: Channels, params: list[torch.Tensor], bucket_mb: int):
        self.channels, self.params, self.buckets = channels, params, _buckets(params, bucket_mb)

    @torch.no_grad()
    def receive(self) -> tuple[int, dict, bool]:
        """(version, extra, stop)."""
        group, device = self.channels.sync_group, self.channels.device
        header = torch.zeros(4, dtype=torch.int64, device=device)
        dist.broadcast(header, src=0, group=group)
        version, buckets, stop, nbytes = header.tolist()
        payload = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(payload, src=0, group=group)
        if stop:
            return version, _from_json(payload), True
        if buckets != len(self.buckets):
            raise RuntimeError(f"trainer 0 sent {buckets} weight buckets, this rank expects {len(self.buckets)}")
        for bucket in self.buckets:
            params = [self.params[i] for i in bucket]
            flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
            dist.broadcast(flat, src=0, group=group)
            offset = 0
            for param in params:
                param.copy_(flat[offset:offset + param.numel()].view_as(param))
                offset += param.numel()
        return version, _from_json(payload), False


# ------------------------------------------------------------------------------------------- batches
def encode_groups(groups: list[RolloutGroup]) -> tuple[list[int], list[float]]:
    """(ints, floats): per group [prompt length, G, G response lengths, has log-probs], then its tokens; floats:
    per group its G rewards then its log-probs (float64: the engine's fp32 values exactly)."""
    ints, floats = [len(groups)], []
    for group in groups:
        has_logprobs = int(bool(group.rollout_logprobs))
        ints += [len(group.prompt), len(group.responses), *map(len, group.responses), has_logprobs, *group.prompt]
        for response in group.responses:
            ints += response
        floats += group.rewards
        if has_logprobs:
            floats += [x for row in group.rollout_logprobs for x in row]
    return ints, floats


def decode_groups(ints: list[int], floats: list[float]) -> list[RolloutGroup]:
    groups, i, f = [], 1, 0
    for _ in range(ints[0]):
        prompt_len, size = ints[i], ints[i + 1]
        lengths = ints[i + 2:i + 2 + size]
        has_logprobs = ints[i + 2 + size]
        i += 3 + size
        prompt = ints[i:i + prompt_len]
        i += prompt_len
        responses = []
        for length in lengths:
            responses.append(ints[i:i + length])
            i += length
        rewards = floats[f:f + size]
        f += size
        logprobs = []
        if has_logprobs:
            for length in lengths:
                logprobs.append(floats[f:f + length])
                f += length
        groups.append(RolloutGroup(prompt, responses, rewards, logprobs))
    return groups


class Outbox:
    """A rollout rank's batches and errors to trainer 0 (isend: sampling goes on while they travel)."""

    def __init__(self, channels: Channels):
        self.channels, self.pending = channels, deque()  # (batch, works, tensors)

    def send(self, kind: int, batch: int, version: int, ints: list[int], floats: list[float], info: dict) -> None:
        device, group = self.channels.device, self.channels.data_group
        payloads = [torch.tensor(ints, dtype=torch.int64, device=device),
                    torch.tensor(floats, dtype=torch.float64, device=device), _json_tensor(info, device)]
        header = torch.tensor([kind, batch, version, *(t.numel() for t in payloads)], dtype=torch.int64,
                              device=device)
        tensors = [header, *payloads]
        works = [dist.isend(t, dst=0, group=group) for t in tensors if t.numel()]
        self.pending.append((batch, works, tensors))

    def release(self, done_before: int) -> None:
        """Wait for the sends of batches < done_before (trainer 0 has received them)."""
        while self.pending and self.pending[0][0] < done_before:
            for work in self.pending.popleft()[1]:
                work.wait()

    def drain(self) -> None:
        self.release(float("inf"))


def recv_batch(channels: Channels, src: int) -> tuple[int, int, int, list[int], list[float], dict]:
    """(kind, batch, version, ints, floats, info) of the next message from rollout rank `src` (blocking)."""
    device, group = channels.device, channels.data_group
    header = torch.zeros(6, dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    kind, batch, version, n_ints, n_floats, n_bytes = header.tolist()
    payloads = [torch.zeros(n, dtype=dtype, device=device)
                for n, dtype in ((n_ints, torch.int64), (n_floats, torch.float64), (n_bytes, torch.uint8))]
    for t in payloads:
        if t.numel():
            dist.recv(t, src=src, group=group)
    return kind, batch, version, payloads[0].tolist(), payloads[1].tolist(), _from_json(payloads[2])
