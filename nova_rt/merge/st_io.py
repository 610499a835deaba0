"""Streaming safetensors I/O for the merge engine: one tensor at a time in, one tensor at a time out.

Reading parses each file's header (8-byte little-endian length + JSON) and preads a single tensor's bytes into a
fresh buffer. It deliberately does not use safetensors.safe_open: safe_open memory-maps the whole file, and every
mapped page a merge touches stays resident (and counted in RSS) until the file is closed, so a streaming merge of a
7B model would still show ~all of its inputs as resident memory. pread keeps the footprint at the tensors in flight.
Writing lays out each shard's header from the planned names/shapes/dtypes first and then streams tensor bytes in
order, so no shard is ever assembled in memory. The layout is the standard one (8-byte header size, JSON header with
data_offsets, header padded with spaces to 8 bytes), readable by safetensors / transformers.
"""

from __future__ import annotations

import json
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
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
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
        begin, end = meta["data_offsets"]
        out[name] = TensorInfo(name, path, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, end - begin)
    return out


class ModelReader:
    """Tensor metadata of a local HF directory (sharded or not) and single-tensor reads."""

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
        self._fds: dict[Path, int] = {}
        cfg = self.path / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.is_file() else {}

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as a fresh CPU tensor (bytes pread straight into its storage)."""
        info = self.tensors[name]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if info.nbytes else memoryview(b"")
        done = 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise OSError(f"{info.file}: unexpected end of file reading tensor {name!r}")
            done += got
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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


class ShardedWriter:
    """Writes planned tensors, in plan order, into model.safetensors or model-0000i-of-0000n shards plus index."""

    def __init__(self, out_dir: Path, plan: list[OutTensor], max_shard_bytes: int):
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
        self._file = None
        self._shard = -1

    def _open_shard(self, si: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {}, 0
        for t in self.shards[si]:
            header[t.name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                                    offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.out_dir / self.names[si], "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._shard = si

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si, planned = self._order[self._pos]
        if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"writer expected {planned} next, got {name!r} {tuple(tensor.shape)} {tensor.dtype}")
        if si != self._shard:
            self._open_shard(si)
        if planned.nbytes:
            self._file.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self._pos += 1

    def finish(self) -> None:
        """Close the last shard and write the index (sharded output only)."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer finished after {self._pos} of {len(self._order)} tensors")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[si] for si, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
