"""PackedBatch: the packed tokens of one micro-batch as a stage hands it to a policy backend (nova_rt.backends), the
base of the stages' typed micro-batches (GRPO: nova_rt.stages.grpo.batches, DPO: nova_rt.stages.dpo).

The token fields are nova_rt.data.packing.collate's layout: one flat row of documents, `targets` already shifted
(targets[t] is the token position t predicts, IGNORE where none). Subclasses add one field per idea (rewards,
reference log-probs, weights...); instances are frozen: a stage that adds a field builds a new one
(dataclasses.replace). SFT and RM micro-batches are still plain dicts of the same token keys; `to_device` moves
either kind.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nova_rt.models.attention import SharedPrefixLayout


@dataclass(frozen=True, kw_only=True)
class PackedBatch:
    """Packed tokens of one micro-batch, and the output options it overrides."""

    input_ids: torch.Tensor
    """(1, T) int64 token ids of the flat packed row."""
    targets: torch.Tensor
    """(T,) int64 shifted targets, IGNORE (-100) where a position has none."""
    position_ids: torch.Tensor
    """(1, T) int64 positions, restarting at 0 at every document."""
    cu_seqlens: torch.Tensor
    """(S+1,) int32 document boundaries."""
    max_seqlen: int
    """The longest document."""
    shared_prefix: SharedPrefixLayout | None = None
    """GRPO's shared-prefix layout of the row (nova_rt.models.attention); None: plain packed documents."""
    ref_topk_ids: torch.Tensor | None = None
    """(N, K) the reference's top-k ids at the N target positions (GRPO's top-k KL): outputs asked `at_ref_topk`
    include the policy's log-probs at them ("topk_logprobs")."""
    temperature: float | None = None
    """The temperature of this micro-batch's outputs; None: the call's (GRPO's PTX rows: 1.0)."""
    entropy: bool | None = None
    """Whether this micro-batch's outputs include the entropy; None: as the call asks (GRPO's PTX rows: False)."""

    @classmethod
    def from_collated(cls, collated: dict, **extra) -> PackedBatch:
        """An instance from collate's dict (its token keys) and the subclass's own fields."""
        return cls(**{key: collated[key] for key in _TOKEN_KEYS}, **extra)

    def model_inputs(self) -> dict:
        """The token fields under collate's keys (what nova_rt.models.causal.batch_logprobs and
        nova_rt.parallel.packed.from_shifted read)."""
        return {key: getattr(self, key) for key in _TOKEN_KEYS}

    def to(self, device) -> PackedBatch:
        """A copy with every tensor (and the shared-prefix layout) on `device`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {name: value.to(device) for name, value in values.items() if isinstance(value, torch.Tensor)}
        if self.shared_prefix is not None:
            moved["shared_prefix"] = self.shared_prefix.to(device)
        return replace(self, **moved)


_TOKEN_KEYS = ("input_ids", "targets", "position_ids", "cu_seqlens", "max_seqlen")


def to_device(micro_batch: PackedBatch | dict, device) -> PackedBatch | dict:
    """A micro-batch (a PackedBatch or an SFT / RM dict) with its tensors on `device`."""
    if isinstance(micro_batch, PackedBatch):
        return micro_batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in micro_batch.items()}


def output_options(micro_batch, temperature: float, entropy: bool) -> tuple[float, bool]:
    """(temperature, entropy) of a micro-batch's outputs: its own where it sets them, else the call's."""
    if not isinstance(micro_batch, PackedBatch):
        return temperature, entropy
    return (temperature if micro_batch.temperature is None else micro_batch.temperature,
            entropy if micro_batch.entropy is None else micro_batch.entropy)
