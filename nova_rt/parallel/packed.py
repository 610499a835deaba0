"""Packed micro-batches for the megatron backend: validation, next-token targets, padding, PackedSeqParams.

A micro-batch is one packed row of S documents:
    input_ids    LongTensor (T,)
    labels       LongTensor (T,)   aligned with input_ids (HF convention); -100 where no loss is taken
      or
    targets      LongTensor (T,)   already shifted (nova_rt convention, see `from_shifted`); used as given
    position_ids LongTensor (T,)   0, 1, ... restarting at every document (RoPE per document)
    cu_seqlens   int32 (S+1,)      0 = cu[0] <= cu[1] <= ... <= cu[S] = T; empty documents are dropped

Position t predicts labels[t+1] (HF causal-LM), except the last token of every document, so no prediction crosses a
document boundary. Micro-batches of a step are padded to one length (pipeline stages exchange fixed shapes) with an
extra document of `pad_id` and no loss; under CP each rank keeps chunks r and 2*cp-1-r of every document and
`cp_index` maps its tokens to their positions. Padding rules: docs/parallelism.md#packed-micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
_KEYS = ("input_ids", "position_ids", "cu_seqlens")


@dataclass
class PackedRow:
    """One validated, padded micro-batch on the training device."""

    input_ids: torch.Tensor  # (Tp,) int64
    targets: torch.Tensor  # (Tp,) int64, -100 = no loss
    position_ids: torch.Tensor  # (Tp,) int64
    cu_seqlens: torch.Tensor  # (S'+1,) int32 on device, padding document included
    max_seqlen: int
    length: int  # T before padding
    source: dict | None = None  # the micro-batch dict this row came from (stage metadata for loss functions)
    cp_index: torch.Tensor | None = None  # context parallel: (Tp/cp,) original position of each local token, -1 pad

    def packed_seq_params(self):
        """thd params. Under CP, cu_seqlens describe the padded *global* row (megatron's RoPE and our attention
        slice the local tokens by them); they go in the *_padded fields too, which megatron's RoPE reads first."""
        from megatron.core.packed_seq_params import PackedSeqParams

        padded = self.cu_seqlens if self.cp_index is not None else None
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def _fail(index: int, field: str, msg: str):
    raise ValueError(f"micro-batch {index}: field {field!r} {msg}")


def validate(mb: dict, index: int = 0) -> torch.Tensor:
    """Check one micro-batch dict; returns its cu_seqlens (int64, CPU) with empty documents removed."""
    if ("labels" in mb) == ("targets" in mb):
        _fail(index, "labels", "or 'targets' (exactly one of them) is required")
    label_key = "labels" if "labels" in mb else "targets"
    for key in (*_KEYS, label_key):
        if key not in mb:
            _fail(index, key, "is missing")
        if not isinstance(mb[key], torch.Tensor) or mb[key].dim() != 1:
            _fail(index, key, "must be a 1-D tensor")
    T = mb["input_ids"].numel()
    if T == 0:
        _fail(index, "input_ids", "is empty")
    for key in (label_key, "position_ids"):
        if mb[key].numel() != T:
            _fail(index, key, f"has {mb[key].numel()} entries, input_ids has {T}")
    if mb["cu_seqlens"].dtype not in (torch.int32, torch.int64):
        _fail(index, "cu_seqlens", f"must be int32 (or int64), got {mb['cu_seqlens'].dtype}")
    cu = mb["cu_seqlens"].to("cpu", torch.int64)
    if cu.numel() < 2 or cu[0] != 0 or cu[-1] != T:
        _fail(index, "cu_seqlens", f"must start at 0 and end at T={T}, got {cu.tolist()}")
    if bool((cu[1:] < cu[:-1]).any()):
        _fail(index, "cu_seqlens", f"must be non-decreasing, got {cu.tolist()}")
    cu = torch.unique_consecutive(cu)
    expected = document_positions(cu)
    if not torch.equal(mb["position_ids"].to("cpu", torch.int64), expected):
        _fail(index, "position_ids", "must restart at 0 at every cu_seqlens boundary (RoPE is per document)")
    return cu


def document_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """0..len-1 for every document of cu_seqlens, concatenated: (T,) int64."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.int64), lengths)
    return torch.arange(int(cu_seqlens[-1]), dtype=torch.int64) - starts


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t+1], and -100 at the last token of every document."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    targets[cu_seqlens[1:].to(torch.int64) - 1] = IGNORE_INDEX
    return targets


def common_length(lengths: list[int], multiple: int = 1) -> int:
    """The padded length for a step: the longest row, rounded up to `multiple`."""
    longest = max(lengths)
    return -(-longest // multiple) * multiple


def prepare(micro_batches: list[dict], *, multiple: int, device, pad_id: int = 0, cp: int = 1,
            cp_rank: int = 0) -> list[PackedRow]:
    """Validate, build targets and pad every micro-batch to the step's common length; move to `device`. With
    cp > 1: documents padded to multiples of 2*cp and each row cut down to CP rank `cp_rank`'s tokens (see the
    module docstring); `multiple` then applies to the local length."""
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    from nova_rt.parallel import context_parallel

    cus = [validate(mb, i) for i, mb in enumerate(micro_batches)]
    layouts = [context_parallel.pad_documents(cu, cp) if cp > 1 else (cu, torch.arange(int(cu[-1]))) for cu in cus]
    length = common_length([int(cu[-1]) for cu, _ in layouts], multiple * (2 * cp if cp > 1 else 1))
    rows = []
    for mb, cu_orig, (cu, index) in zip(micro_batches, cus, layouts):
        T = int(cu_orig[-1])
        ids = mb["input_ids"].to("cpu", torch.int64)
        targets = mb["targets"].to("cpu", torch.int64) if "targets" in mb else \
            next_token_targets(mb["labels"].to("cpu", torch.int64), cu_orig)
        if length > int(cu[-1]):
            index = torch.cat([index, torch.full((length - int(cu[-1]),), -1, dtype=torch.int64)])
            cu = torch.cat([cu, torch.tensor([length])])
        real = index >= 0
        ids = torch.where(real, ids[index.clamp(min=0)], pad_id)
        targets = torch.where(real, targets[index.clamp(min=0)], IGNORE_INDEX)
        positions = document_positions(cu)
        cp_index = None
        if cp > 1:
            local = context_parallel.local_positions(cu, cp, cp_rank)
            ids, targets, positions, cp_index = ids[local], targets[local], positions[local], index[local].to(device)
        rows.append(PackedRow(
            input_ids=ids.to(device), targets=targets.to(device), position_ids=positions.to(device),
            cu_seqlens=cu.to(device=device, dtype=torch.int32), max_seqlen=int((cu[1:] - cu[:-1]).max()),
            length=T, source=mb, cp_index=cp_index,
        ))
    return rows


def from_shifted(mb: dict) -> dict:
    """A nova_rt collated micro-batch (nova_rt.data.packing.collate: input_ids/position_ids (1, T), `targets` shifted)
    as a megatron micro-batch of 1-D tensors. The shifted targets are used as given, which keeps a target at a
    document's last position (GRPO rows end with the input before the last response token, whose target is that
    token). Every other key (pair ids, reference log-probs, rewards, ...) is kept for the stage's loss function."""
    return {**mb, "input_ids": mb["input_ids"].reshape(-1), "position_ids": mb["position_ids"].reshape(-1),
            "targets": mb["targets"].reshape(-1).to(torch.int64)}
