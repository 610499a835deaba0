"""Input side of the streaming merge: safetensors headers, zero-copy tensor views, and planned output tensors.

Reading parses each file's header (8-byte little-endian length + JSON) itself and memory-maps the file: `view(name)`
is a tensor over the mapped bytes, so no input byte is copied (the merge ops read the page cache directly). Mapped
pages count in the process's RSS while mapped, so once a tensor is merged `release(name)` drops its page-table
entries (MADV_DONTNEED: the page cache keeps the data) and the footprint stays at the tensors in flight; safe_open
would keep every touched page of a file resident until the file is closed. `prefetch(name)` faults a tensor's pages
in ahead of use (MADV_POPULATE_READ, Linux >= 5.14, else MADV_WILLNEED), from a background thread: ctypes calls
release the GIL. A tensor whose offset is not a multiple of its element size is read with pread instead.
Why maps: on the benchmark VM (2026-11-21) memory touched for the first time costs 1.3-2.6 s/GB (see st_writer.py),
so the former pread into a fresh buffer per tensor spent seconds in page faults; mapping 3 GB of cached input pages
takes ~0.1 s. The output side is st_writer.py.
"""
from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_MADV_WILLNEED, _MADV_DONTNEED, _MADV_POPULATE_READ = 3, 4, 22


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise = _libc_madvise()
_populate = [_MADV_POPULATE_READ]  # falls back to WILLNEED once the kernel rejects POPULATE_READ


def _advise(addr: int, length: int, advice: int) -> bool:
    """madvise over the pages covering [addr, addr + length); False when unsupported or refused."""
    if _madvise is None or length <= 0:
        return False
    start = addr & ~(mmap.PAGESIZE - 1)
    end = -(-(addr + length) // mmap.PAGESIZE) * mmap.PAGESIZE
    return _madvise(start, end - start, advice) == 0


def _prefetch_pages(addr: int, length: int) -> None:
    if not _advise(addr, length, _populate[0]) and _populate[0] == _MADV_POPULATE_READ:
        if ctypes.get_errno() == errno.EINVAL:  # kernel < 5.14
            _populate[0] = _MADV_WILLNEED
            _advise(addr, length, _MADV_WILLNEED)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"{path}: corrupt safetensors file (header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: corrupt safetensors header: {exc}") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        dtype, shape = ST_DTYPES[meta["dtype"]], tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _element_size(dtype) or begin < 0:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {[begin, end]} but shape {list(shape)} "
                             f"{meta['dtype']} needs {numel * _element_size(dtype)} bytes")
        if 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name!r} ends at byte {8 + n + end} but the file has {size} bytes "
                             "(truncated or corrupt)")
        out[name] = TensorInfo(name, path, dtype, shape, 8 + n + begin, end - begin)
    return out


class _MappedFile:
    """One input file mapped whole, copy-on-write (never written: writable only so torch.frombuffer wraps it without
    a warning), as a uint8 tensor plus its address for madvise."""

    def __init__(self, path: Path, size: int):
        fd = os.open(path, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        self.u8 = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.addr = self.u8.data_ptr()

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """View of [offset, offset + nbytes) as dtype/shape, or None when the offset is misaligned for dtype."""
        if nbytes == 0 or offset % _element_size(dtype):
            return None
        return self.u8[offset: offset + nbytes].view(dtype).reshape(shape)

    def close(self) -> None:
        del self.u8
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view: the mapping goes when the last view is freed
            pass


class ModelReader:
    """Tensor metadata of a local HF directory (sharded or not) and zero-copy single-tensor views."""

    def __init__(self, path: Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.label}: no *.safetensors weights in {self.path} "
                                    "(pytorch_model.bin checkpoints are not supported; convert them first)")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            for name, info in _read_header(self.path / fname).items():
                if name in self.tensors:
                    raise ValueError(f"{self.label}: tensor {name!r} appears in two shards")
                self.tensors[name] = info
        self._maps = {f: _MappedFile(self.path / f, (self.path / f).stat().st_size) for f in files}
        cfg = self.path / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.is_file() else {}

    def view(self, name: str) -> torch.Tensor:
        """The tensor `name` over the file's mapped bytes (read-only use), or a pread copy when misaligned."""
        info = self.tensors[name]
        t = self._maps[info.file.name].tensor(info.offset, info.nbytes, info.dtype, info.shape)
        return t if t is not None else self.read(name)

    def _span(self, name: str, start: int, stop: int | None) -> tuple[TensorInfo, int, int]:
        """(info, absolute file offset, bytes) of flat elements [start, stop) of `name` (stop None: the end)."""
        info = self.tensors[name]
        esize = _element_size(info.dtype)
        end = info.nbytes if stop is None else stop * esize
        return info, info.offset + start * esize, end - start * esize

    def view_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of `name` (row-blocked merging): a view of the mapping, or a pread copy."""
        info, offset, nbytes = self._span(name, start, stop)
        t = self._maps[info.file.name].tensor(offset, nbytes, info.dtype, (stop - start,))
        return t if t is not None else self._pread(info, offset, nbytes).view(info.dtype)

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Fault the tensor's pages (of flat elements [start, stop)) in now (reads them from disk if they are not
        cached); GIL released."""
        info, offset, nbytes = self._span(name, start, stop)
        _prefetch_pages(self._maps[info.file.name].addr + offset, nbytes)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the tensor's pages (of flat elements [start, stop)) from this process's RSS (the page cache keeps
        them)."""
        info, offset, nbytes = self._span(name, start, stop)
        _advise(self._maps[info.file.name].addr + offset, nbytes, _MADV_DONTNEED)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as a fresh CPU tensor (bytes pread straight into its storage)."""
        info = self.tensors[name]
        return self._pread(info, info.offset, info.nbytes).view(info.dtype).reshape(info.shape)

    @staticmethod
    def _pread(info: TensorInfo, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"{info.file}: unexpected end of file reading tensor {info.name!r}")
                done += got
        finally:
            os.close(fd)
        return buf

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: str | int) -> int:
    """'2GB' -> 2e9, '500MiB' -> 500 * 2^20, plain integers are bytes (as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"max shard size {size!r} is not a size like '2GB', '500MB' or '1GiB'") from None
