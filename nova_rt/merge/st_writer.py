"""Output side of the streaming merge: safetensors shards written with O_DIRECT from one reused staging arena.

Each output tensor gets a slot in the arena (`slot(name)`), which the merge op writes directly; `write(name, t)`
commits it (copying t in first unless t is the slot). Whole 4 KiB blocks of committed bytes go to the shard file by
pwrite with O_DIRECT from a background thread (the GIL is released), about every 8 MiB, so writing overlaps the merge
of the next tensors; the arena is reused from its start once the queued writes have drained. A shard's last partial
block is written padded and the file truncated. Filesystems that refuse O_DIRECT (tmpfs) go through the page cache.

Why O_DIRECT: on VMs where first-touch memory is slow, the arena is faulted once and the output never enters the
page cache (measured: docs/benchmarks.md#notes-from-module-docstrings). No fsync, like mergekit; the engine's rename
makes the output appear atomically. The layout is the standard one (8-byte header size, JSON header with
data_offsets, padded with spaces to 8 bytes), readable by safetensors / transformers.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from nova_rt.merge.st_io import INDEX_NAME, SINGLE_NAME, ST_NAMES, OutTensor

_BLOCK = 4096  # O_DIRECT alignment of file offsets, lengths and buffers (covers 512-byte and 4K devices)
_FLUSH = 8 << 20  # queue a write once this many whole blocks are committed
_MADV_HUGEPAGE = 14


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class _Arena:
    """Page-aligned anonymous buffer, with transparent huge pages where the kernel allows (half the fault cost)."""

    def __init__(self, nbytes: int):
        self.mm = mmap.mmap(-1, nbytes)
        try:
            self.mm.madvise(_MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
        self.u8 = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.addr = self.u8.data_ptr()
        self.view = memoryview(self.mm)

    def close(self) -> None:
        try:
            self.view.release()
        except BufferError:
            pass
        del self.u8
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a slot view: the mapping goes when the last view is freed
            pass


class _ShardFile:
    """One shard: bytes are appended through the arena; file offset x lives at arena offset x - self.base."""

    def __init__(self, path: Path, arena: _Arena, capacity: int, pool: ThreadPoolExecutor):
        self.path, self.arena, self.capacity, self.pool = path, arena, capacity, pool
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0  # bytes appended
        self.base = 0  # file offset at arena offset 0 (a block boundary)
        self.queued = 0  # file offset up to which writes are queued (a block boundary)
        self.pending: deque[Future] = deque()

    def reserve(self, nbytes: int) -> int:
        """Arena offset where the next nbytes of the file go (contiguous)."""
        if self.size - self.base + nbytes > self.capacity:
            self._wrap()
        return self.size - self.base

    def commit(self, nbytes: int) -> None:
        self.size += nbytes
        whole = self.size // _BLOCK * _BLOCK
        if whole - self.queued >= _FLUSH:
            self._queue(whole)

    def _queue(self, end: int) -> None:
        """Write file bytes [queued, end) (end a block boundary, or the padded end of the file)."""
        if end > self.queued:
            lo = self.queued - self.base
            self.pending.append(self.pool.submit(_pwrite_all, self.fd, self.arena.view[lo: end - self.base],
                                                 self.queued, self.path))
            self.queued = end
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()

    def _drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def _wrap(self) -> None:
        """Write out everything but the partial last block, then move that block to the arena's start."""
        whole = self.size // _BLOCK * _BLOCK
        self._queue(whole)
        self._drain()
        tail = self.size - whole
        if tail:
            src = whole - self.base
            self.arena.u8[:tail].copy_(self.arena.u8[src: src + tail].clone())
        self.base = whole

    def close(self) -> None:
        """Write the rest (the last block zero-padded), drain, and truncate the file to its size."""
        try:
            end = _round_up(self.size, _BLOCK)
            if end > self.size:
                self.arena.u8[self.size - self.base: end - self.base].zero_()
            self._queue(end)
            self._drain()
            os.ftruncate(self.fd, self.size)
        finally:
            self.abort()

    def abort(self) -> None:
        for f in self.pending:  # the writer thread reads the arena: let it finish before anything is unmapped
            f.exception()
        self.pending.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as exc:
        raise OSError(exc.errno, f"writing output shard {path} at byte {offset + done}: {exc.strerror}") from None


class ShardedWriter:
    """Writes planned tensors, in plan order, into model.safetensors or model-0000i-of-0000n shards plus index."""

    def __init__(self, out_dir: Path, plan: list[OutTensor], max_shard_bytes: int, largest: int | None = None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        self.shards = shards
        n = len(shards)
        self.names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(si, t) for si, shard in enumerate(shards) for t in shard]
        self._pos = 0
        # Room for the largest tensor plus up to 32 MiB of smaller ones between drains, plus two blocks for the
        # partial block carried over a wrap and the padded end of a shard. `largest`: the most bytes committed at
        # once (row-blocked merging commits a large tensor in parts: part_slot / commit_part).
        largest = max((t.nbytes for t in plan), default=0) if largest is None else largest
        headers = max(len(self._header(shard)) for shard in shards)
        self._capacity = _round_up(max(largest, headers) + min(max(largest, 1 << 20), 32 << 20) + _BLOCK, _BLOCK)
        self._arena = _Arena(self._capacity + _BLOCK)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="merge-write")
        self._file: _ShardFile | None = None
        self._shard = -1
        self._slot: int | None = None  # arena offset reserved for the next tensor
        self._part_done = 0  # bytes of the next tensor committed by commit_part

    @staticmethod
    def _header(shard: list[OutTensor]) -> bytes:
        header, offset = {}, 0
        for t in shard:
            header[t.name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob

    def _open_shard(self, si: int) -> None:
        self._close_file()
        self._file = _ShardFile(self.out_dir / self.names[si], self._arena, self._capacity, self._pool)
        head = self._header(self.shards[si])
        at = self._file.reserve(len(head))
        self._arena.u8[at: at + len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        self._file.commit(len(head))
        self._shard = si

    def _next(self, name: str, nbytes: int | None = None) -> OutTensor:
        """The next planned tensor, checked to be `name`; reserves its slot (or, when nbytes is given, the arena
        room of its next part)."""
        si, planned = self._order[self._pos]
        if name != planned.name:
            raise RuntimeError(f"writer expected {planned} next, got {name!r}")
        if si != self._shard:
            self._open_shard(si)
        if self._slot is None:
            if nbytes is not None and self._part_done + nbytes > planned.nbytes:
                raise RuntimeError(f"writer: parts of {name!r} exceed its {planned.nbytes} bytes")
            self._slot = self._file.reserve(planned.nbytes if nbytes is None else nbytes)
        return planned

    def part_slot(self, name: str, numel: int) -> torch.Tensor | None:
        """Where the next `numel` elements of tensor `name` go (flat; None when misaligned, as `slot`)."""
        esize = torch.empty((), dtype=self._order[self._pos][1].dtype).element_size()
        t = self._next(name, numel * esize)
        if numel == 0 or (self._file.size % esize):
            return None
        return self._arena.u8[self._slot: self._slot + numel * esize].view(t.dtype)

    def commit_part(self, name: str, tensor: torch.Tensor) -> None:
        """Commit the next part of tensor `name` (copied in unless it is the part_slot); the tensor is complete
        once its parts add up to its size."""
        esize = torch.empty((), dtype=self._order[self._pos][1].dtype).element_size()
        planned = self._next(name, tensor.numel() * esize)
        if tensor.dtype != planned.dtype:
            raise RuntimeError(f"writer expected {planned} next, got a {tensor.dtype} part of {name!r}")
        at, nbytes = self._slot, tensor.numel() * esize
        if nbytes and tensor.data_ptr() != self._arena.addr + at:
            self._arena.u8[at: at + nbytes].copy_(tensor.contiguous().reshape(-1).view(torch.uint8))
        self._file.commit(nbytes)
        self._slot = None
        self._part_done += nbytes
        if self._part_done == planned.nbytes:
            self._part_done = 0
            self._pos += 1

    def slot(self, name: str) -> torch.Tensor | None:
        """Where the next planned tensor `name` goes, as a tensor to write into (None when its file offset is not a
        multiple of its element size: pass the result to `write` instead)."""
        t = self._next(name)
        at, esize = self._slot, torch.empty((), dtype=t.dtype).element_size()
        if t.nbytes == 0 or (self._file.size % esize):
            return None
        return self._arena.u8[at: at + t.nbytes].view(t.dtype).reshape(t.shape)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Commit the next planned tensor (copied into its slot unless it is the slot)."""
        if self._part_done:
            raise RuntimeError(f"writer: {name!r} was started in parts; commit the rest with commit_part")
        planned = self._next(name)
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"writer expected {planned} next, got {name!r} {tuple(tensor.shape)} {tensor.dtype}")
        at = self._slot
        if planned.nbytes and tensor.data_ptr() != self._arena.addr + at:
            self._arena.u8[at: at + planned.nbytes].copy_(tensor.contiguous().reshape(-1).view(torch.uint8))
        self._file.commit(planned.nbytes)
        self._slot = None
        self._pos += 1

    def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close()

    def finish(self) -> None:
        """Close the last shard and write the index (sharded output only)."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer finished after {self._pos} of {len(self._order)} tensors")
        try:
            self._close_file()
        finally:
            self._release()
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[si] for si, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None
        self._release()

    def _release(self) -> None:
        self._pool.shutdown(wait=True)
        if self._arena is not None:
            self._arena.close()
            self._arena = None
