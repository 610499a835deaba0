"""Best-fit-decreasing packing of variable-length samples, and the global-batch schedule built on it.

A packed row holds several samples back to back: `cu_seqlens` marks their boundaries, `position_ids` restart at 0
for every sample, and attention never crosses a boundary (packed attention consumes cu_seqlens). Targets are
already shifted per sample (nova_rt.data.chat), so no target crosses a boundary either.

Batches: the rows are shuffled per epoch by a generator seeded with (seed, epoch); optimizer step s uses rows
[o, o + global_batch) of epoch s // steps_per_epoch's permutation. The data position is therefore a pure
function of the step, which is what makes a resumed run see exactly the batches an uninterrupted one would.

Loss weights: every target token gets a weight so that the global-batch loss is -sum(w * logp) over all
micro-batches of all ranks; "token" gives 1/N_tokens(global batch), "sequence" 1/(n_sample * N_samples).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from nova_rt.data.chat import IGNORE, Sample
from nova_rt.errors import UserError


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items (by index) to bins of `capacity`: longest first, each into the fullest bin it still fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise UserError(f"sample {i} has {n} tokens, more than packing.max_tokens={capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            rem, b = free.pop(j)
            bins[b].append(i)
            rem -= n
        else:
            b = len(bins)
            bins.append([i])
            rem = capacity - n
        if rem > 0:
            bisect.insort(free, (rem, b))
    return bins


@dataclass
class PackedRow:
    input_ids: np.ndarray  # (T,)
    targets: np.ndarray  # (T,)
    position_ids: np.ndarray  # (T,)
    cu_seqlens: np.ndarray  # (S+1,) int32

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def make_row(samples: list[Sample]) -> PackedRow:
    lens = [len(s) for s in samples]
    cu = np.zeros(len(samples) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lens)
    return PackedRow(
        input_ids=np.concatenate([s.input_ids for s in samples]),
        targets=np.concatenate([s.targets for s in samples]),
        position_ids=np.concatenate([np.arange(n, dtype=np.int64) for n in lens]),
        cu_seqlens=cu,
    )


def pack_samples(samples: list[Sample], max_tokens: int, enabled: bool = True) -> tuple[list[PackedRow], float]:
    """Pack samples into rows; returns the rows and the token utilization (real tokens / token slots)."""
    if not samples:
        return [], 0.0
    if not enabled:
        rows = [make_row([s]) for s in samples]
        slots = len(rows) * max(len(s) for s in samples)  # what a padded batch would spend
    else:
        bins = best_fit_decreasing([len(s) for s in samples], max_tokens)
        rows = [make_row([samples[i] for i in sorted(b)]) for b in bins]
        slots = len(rows) * max_tokens
    return rows, sum(len(s) for s in samples) / slots


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x6E6F7661]).permutation(n)


class BatchSchedule:
    """Which packed rows form the global batch of each optimizer step, and each rank's micro-batches."""

    def __init__(self, num_rows: int, global_batch: int, micro_batch: int, world_size: int, seed: int,
                 shuffle: bool = True):
        per_rank, rem = divmod(global_batch, world_size)
        if rem or per_rank % micro_batch:
            raise UserError(f"train.global_batch={global_batch} must be divisible by world_size={world_size} "
                            f"x train.micro_batch={micro_batch}")
        if num_rows < global_batch:
            raise UserError(f"only {num_rows} packed rows but train.global_batch={global_batch}: "
                            "add data or lower the batch")
        self.num_rows, self.global_batch, self.micro_batch = num_rows, global_batch, micro_batch
        self.world_size, self.seed, self.shuffle = world_size, seed, shuffle
        self.steps_per_epoch = num_rows // global_batch
        self._perm_cache: dict[int, np.ndarray] = {}

    def global_rows(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(self.num_rows, self.seed, epoch, self.shuffle)}
        return self._perm_cache[epoch][k * self.global_batch:(k + 1) * self.global_batch]

    def rank_micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        rows = self.global_rows(step)
        per_rank = self.global_batch // self.world_size
        mine = rows[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]


def loss_weights(rows: list[PackedRow], reduction: str) -> list[np.ndarray]:
    """Per-token loss weights for the rows of one global batch (see module docstring)."""
    if reduction == "token":
        total = sum(int((r.targets != IGNORE).sum()) for r in rows)
        return [(r.targets != IGNORE) / max(total, 1) for r in rows]
    if reduction == "sequence":
        per_row, n_seq = [], 0
        for r in rows:
            w = np.zeros(len(r.targets))
            for a, b in zip(r.cu_seqlens[:-1], r.cu_seqlens[1:]):
                m = r.targets[a:b] != IGNORE
                if m.any():
                    w[a:b] = m / m.sum()
                    n_seq += 1
            per_row.append(w)
        return [w / max(n_seq, 1) for w in per_row]
    raise UserError(f"train.loss_reduction must be 'token' or 'sequence', got {reduction!r}")


def collate(rows: list[PackedRow], weights: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Join rows into one flat (1, T) micro-batch with concatenated cu_seqlens (padding-free)."""
    cu, off = [0], 0
    for r in rows:
        cu.extend((r.cu_seqlens[1:] + off).tolist())
        off += r.num_tokens
    cu_t = torch.tensor(cu, dtype=torch.int32)
    batch = {
        "input_ids": torch.from_numpy(np.concatenate([r.input_ids for r in rows])).unsqueeze(0),
        "targets": torch.from_numpy(np.concatenate([r.targets for r in rows])),
        "position_ids": torch.from_numpy(np.concatenate([r.position_ids for r in rows])).unsqueeze(0),
        "cu_seqlens": cu_t,
        "max_seqlen": int((cu_t[1:] - cu_t[:-1]).max()),
    }
    if weights is not None:
        batch["weights"] = torch.from_numpy(np.concatenate(weights)).to(torch.float32)
    return batch
