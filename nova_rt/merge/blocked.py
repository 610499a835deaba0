"""Row-blocked merging: a tensor larger than the block budget (run_merge's block_mb) is merged in blocks of rows.

Blocks are flat element ranges of the row-major tensor, cut at multiples of 1024 elements (the ops' own block, so
reductions keep their order). Each block is a view of the mapped inputs; the next block is faulted in by the
prefetch thread while this one is merged, and a finished block's pages are dropped (MADV_DONTNEED), so the inputs in
RSS are two blocks per model, not the tensor. The output is committed to the writer block by block.
Exact (bit-identical to the whole-tensor path): linear; task_arithmetic, dare_linear, dare_ties (DARE draws use the
flat index); ties (first passes: a 16-bit-digit radix select whose histograms are summed over the blocks, 2 passes
for 16/32-bit floats and 4 for fp64, then per-block counts of the threshold's ties for the cutoff; last pass: trim,
elect, merge per block); slerp (first pass: |a|^2, |b|^2, <a, b> summed in the whole pass's fixed chunks). Every
other method merges each tensor whole (methods.BLOCKED_KINDS); so do inputs that are LoRA adapters, CUDA devices,
impl="torch" and builds without the extension.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from nova_rt.merge import methods, ops
from nova_rt.merge.reference import SPARSIFY_MAGNITUDE
from nova_rt.merge.registry import TensorMerge
from nova_rt.merge.st_io import ModelReader
from nova_rt.merge.st_writer import ShardedWriter

BLOCK_ALIGN = 1024  # elements; csrc/merge/merge_cpu.h kBlock
_BINS = 1 << 16
_INT64_MAX = (1 << 63) - 1


def block_elements(block_bytes: int, element_size: int) -> int:
    """Elements per block for a budget of block_bytes per input (a multiple of BLOCK_ALIGN, at least one)."""
    return max(BLOCK_ALIGN, block_bytes // element_size // BLOCK_ALIGN * BLOCK_ALIGN)


class BlockReader:
    """One tensor's blocks in every input: `blocks()` is one pass over [0, numel) in steps of `step` elements."""

    def __init__(self, readers: list[ModelReader], sources: tuple[str, ...], numel: int, step: int,
                 dtype: torch.dtype | None, pool: ThreadPoolExecutor):
        self.readers, self.sources, self.numel, self.step = readers, sources, numel, step
        self.dtype, self.pool = dtype, pool  # dtype: cast every block to it (the config's `dtype`), or None

    def _prefetch(self, start: int, stop: int) -> None:
        for reader, source in zip(self.readers, self.sources):
            reader.prefetch(source, start, stop)

    def blocks(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """(start, stop, one flat block per input); the caller must be done with the block before the next."""
        ranges = [(start, min(start + self.step, self.numel)) for start in range(0, self.numel, self.step)]
        pending: Future | None = None
        ahead = None  # the range being prefetched
        try:
            for index, (start, stop) in enumerate(ranges):
                if pending is not None:
                    pending.result()
                    pending = None
                ahead = ranges[index + 1] if index + 1 < len(ranges) else None
                if ahead is not None:
                    pending = self.pool.submit(self._prefetch, *ahead)
                try:
                    views = [reader.view_range(source, start, stop) for reader, source in zip(self.readers,
                                                                                               self.sources)]
                    if self.dtype is not None:
                        views = [view.to(self.dtype) for view in views]
                    yield start, stop, views
                    del views
                finally:
                    for reader, source in zip(self.readers, self.sources):
                        reader.release(source, start, stop)
        finally:
            if pending is not None:  # the pass stopped early (or failed): drop the block prefetched for it too
                pending.result()
                for reader, source in zip(self.readers, self.sources):
                    reader.release(source, *ahead)


def _magnitude_k(density: float, numel: int) -> int:
    """Elements TIES keeps: as merge_cpu.cpp magnitude_k (mergekit's rule)."""
    if density >= 1.0:
        return numel
    if density <= 0.0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_keep(source: BlockReader, densities: tuple[float, ...]) -> tuple[list[int], list[int]]:
    """Per model (threshold bits, tie cutoff) keeping exactly the top-k |x_i - base| of the whole tensor, ties at
    the threshold kept in index order: the rule csrc/merge/topk_cpu.cpp finds over a whole tensor."""
    ext = ops.load_extension()
    n = source.numel
    width = 64 if (source.dtype or source.readers[0].tensors[source.sources[0]].dtype) == torch.float64 else 32
    keep_none = (1 << (width - 1)) - 1
    ks = [_magnitude_k(density, n) for density in densities]
    thr = [0 if k == n else keep_none for k in ks]  # keep all: (0, max cutoff); keep none: (max bits, 0)
    cutoff = [_INT64_MAX if k == n else 0 for k in ks]
    active = [i for i, k in enumerate(ks) if 0 < k < n]
    need = {i: ks[i] for i in active}
    prefix = {i: 0 for i in active}
    equal = {}
    for shift in range(width - 16, -1, -16) if active else ():
        hist = torch.zeros(len(active), _BINS, dtype=torch.int64)
        prefixes = [-1 if shift + 16 >= width else prefix[i] for i in active]
        for _, _, block in source.blocks():
            ext.magnitude_histogram(block[0], [block[1 + i] for i in active], shift, prefixes, hist)
        for row, i in enumerate(active):
            above = hist[row].flip(0).cumsum(0)  # above[j]: elements in the bins >= 65535 - j
            j = int(torch.searchsorted(above, need[i]))  # first j with above[j] >= need
            if j > 0:
                need[i] -= int(above[j - 1])
            prefix[i] = (prefix[i] << 16) | (_BINS - 1 - j)
            equal[i] = int(hist[row, _BINS - 1 - j])
    for i in active:
        thr[i] = prefix[i]
        cutoff[i] = _INT64_MAX if need[i] == equal[i] else -1  # -1: the need-th tie's index is still to be found
    pending = [i for i in active if cutoff[i] < 0]
    if pending:
        for start, _, block in source.blocks():
            counts = ext.magnitude_equal_counts(block[0], [block[1 + i] for i in pending], [thr[i] for i in pending])
            for i, count in zip(list(pending), counts):
                if count >= need[i]:
                    cutoff[i] = start + ext.magnitude_nth_equal(block[0], block[1 + i], thr[i], need[i])
                    pending.remove(i)
                else:
                    need[i] -= count
            if not pending:
                break
    return thr, cutoff


def merge_blocked(method: str, m: TensorMerge, source: BlockReader, writer: ShardedWriter) -> None:
    """Merge one tensor block by block into the writer. method: a key of methods.BLOCKED_KINDS; m carries the
    tensor's name and parameters (its base and tensors are unused); source: the base (when the method uses one)
    and the models."""
    kind, name = methods.BLOCKED_KINDS[method], m.name
    if kind not in ("linear", "gta", "slerp"):
        raise ValueError(f"no blocked merge of kind {kind!r}")
    if kind == "linear":
        weights, scale = methods.linear_weights(m)
    elif kind == "gta":
        params = methods.GTA_PARAMS[method](m)
        keep = magnitude_keep(source, params.densities) if params.sparsify == SPARSIFY_MAGNITUDE else None
    else:
        ext = ops.load_extension()
        partials = None
        for start, _, block in source.blocks():
            if partials is None:  # without `part` the op returns the number of chunks
                chunks = ext.slerp_partials(block[0], block[1], start, source.numel)
                partials = torch.zeros(chunks, 3, dtype=torch.float64)
            ext.slerp_partials(block[0], block[1], start, source.numel, partials)
    for start, stop, block in source.blocks():
        out = writer.part_slot(name, stop - start)  # None when misaligned: the op returns a tensor to copy
        if kind == "linear":
            out = ops.weighted_sum(block, weights, scale, out_dtype=m.out_dtype, impl="ext", out=out)
        elif kind == "gta":
            out = ops.gta(block[0], block[1:], params, out_dtype=m.out_dtype, impl="ext", out=out, offset=start,
                          keep=keep)
        else:
            out = ops.slerp(block[0], block[1], m.params["t"], out_dtype=m.out_dtype, impl="ext", out=out,
                            partials=partials)
        writer.commit_part(name, out)
        del out
