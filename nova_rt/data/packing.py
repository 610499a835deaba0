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
        length = lengths[i]
        if length > capacity:
            raise UserError(f"sample {i} has {length} tokens, more than packing.max_tokens={capacity}")
        j = bisect.bisect_left(free, (length, -1))
        if j < len(free):
            remaining, bin_id = free.pop(j)
            bins[bin_id].append(i)
            remaining -= length
        else:
            bin_id = len(bins)
            bins.append([i])
            remaining = capacity - length
        if remaining > 0:
            bisect.insort(free, (remaining, bin_id))
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
    lens = [len(sample) for sample in samples]
    cu_seqlens = np.zeros(len(samples) + 1, dtype=np.int32)
    cu_seqlens[1:] = np.cumsum(lens)
    return PackedRow(
        input_ids=np.concatenate([sample.input_ids for sample in samples]),
        targets=np.concatenate([sample.targets for sample in samples]),
        position_ids=np.concatenate([np.arange(length, dtype=np.int64) for length in lens]),
        cu_seqlens=cu_seqlens,
    )


def pack_samples(samples: list[Sample], max_tokens: int, enabled: bool = True) -> tuple[list[PackedRow], float]:
    """Pack samples into rows; returns the rows and the token utilization (real tokens / token slots)."""
    if not samples:
        return [], 0.0
    if not enabled:
        rows = [make_row([sample]) for sample in samples]
        slots = len(rows) * max(len(sample) for sample in samples)  # what a padded batch would spend
    else:
        bins = best_fit_decreasing([len(sample) for sample in samples], max_tokens)
        rows = [make_row([samples[i] for i in sorted(group)]) for group in bins]
        slots = len(rows) * max_tokens
    return rows, sum(len(sample) for sample in samples) / slots


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
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(self.num_rows, self.seed, epoch, self.shuffle)}
        return self._perm_cache[epoch][step_in_epoch * self.global_batch:(step_in_epoch + 1) * self.global_batch]

    def rank_micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        rows = self.global_rows(step)
        per_rank = self.global_batch // self.world_size
        mine = rows[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]


def loss_weights(rows: list[PackedRow], reduction: str) -> list[np.ndarray]:
    """Per-token loss weights for the rows of one global batch (see module docstring)."""
    if reduction == "token":
        total = sum(int((row.targets != IGNORE).sum()) for row in rows)
        return [(row.targets != IGNORE) / max(total, 1) for row in rows]
    if reduction == "sequence":
        per_row, n_seq = [], 0
        for row in rows:
            row_weights = np.zeros(len(row.targets))
            for start, end in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]):
                mask = row.targets[start:end] != IGNORE
                if mask.any():
                    row_weights[start:end] = mask / mask.sum()
                    n_seq += 1
            per_row.append(row_weights)
        return [row_weights / max(n_seq, 1) for row_weights in per_row]
    raise UserError(f"train.loss_reduction must be 'token' or 'sequence', got {reduction!r}")


def collate(rows: list[PackedRow], weights: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Join rows into one flat (1, T) micro-batch with concatenated cu_seqlens (padding-free)."""
    cu_seqlens, offset = [0], 0
    for row in rows:
        cu_seqlens.extend((row.cu_seqlens[1:] + offset).tolist())
        offset += row.num_tokens
    cu_seqlens_tensor = torch.tensor(cu_seqlens, dtype=torch.int32)
    batch = {
        "input_ids": torch.from_numpy(np.concatenate([row.input_ids for row in rows])).unsqueeze(0),
        "targets": torch.from_numpy(np.concatenate([row.targets for row in rows])),
        "position_ids": torch.from_numpy(np.concatenate([row.position_ids for row in rows])).unsqueeze(0),
        "cu_seqlens": cu_seqlens_tensor,
        "max_seqlen": int((cu_seqlens_tensor[1:] - cu_seqlens_tensor[:-1]).max()),
    }
    if weights is not None:
        batch["weights"] = torch.from_numpy(np.concatenate(weights)).to(torch.float32)
    return batch
