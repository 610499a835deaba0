"""Safetensors I/O of the merge engine: zero-copy input views and the O_DIRECT staging writer, read back with the
safetensors library, including arena wrap-arounds, misaligned tensors, shards, and the buffered fallback."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open

from nova_rt.merge.st_io import ModelReader, OutTensor
from nova_rt.merge.st_writer import ShardedWriter


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Mixed sizes and dtypes; odd-sized uint8 tensors put the ones after them at misaligned offsets."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(40):
        kind = i % 4
        if kind == 0:
            out[f"t{i:02d}.u8"] = torch.randint(0, 255, (int(torch.randint(1, 50, (1,), generator=g)),),
                                                generator=g, dtype=torch.uint8)
        elif kind == 1:
            out[f"t{i:02d}.bf16"] = torch.randn(int(torch.randint(1, 300, (1,), generator=g)), 129,
                                                generator=g).bfloat16()
        elif kind == 2:
            out[f"t{i:02d}.f32"] = torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g)
        else:
            out[f"t{i:02d}.f32"] = torch.randn(257, 1023, generator=g)  # ~1 MiB: the largest, forces wraps
    return out


def _read_back(out_dir) -> dict[str, torch.Tensor]:
    got = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
    return got


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("use_slots", [True, False])
def test_writer_round_trip(tmp_path, monkeypatch, direct, use_slots):
    seed = int.from_bytes(os.urandom(4), "little")
    tensors = _random_tensors(seed)
    if not direct:  # a filesystem that refuses O_DIRECT (tmpfs): same bytes through the page cache
        real_open = os.open

        def no_direct(path, flags, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "O_DIRECT not supported")
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", no_direct)
    plan = [OutTensor(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=3 << 20)
    for name, t in tensors.items():
        slot = writer.slot(name) if use_slots else None
        if slot is not None:
            slot.copy_(t)
            writer.write(name, slot)
        else:
            writer.write(name, t)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3, "expected several shards"
    got = _read_back(tmp_path)
    assert set(got) == set(tensors) and all(torch.equal(got[k], t) for k, t in tensors.items()), f"seed={seed}"


def test_writer_rejects_out_of_plan_tensors(tmp_path):
    t = torch.zeros(3)
    writer = ShardedWriter(tmp_path, [OutTensor("a", torch.float32, (3,))], max_shard_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="writer expected .*'a'.* next, got 'b'"):
        writer.write("b", t)
    with pytest.raises(RuntimeError, match=r"got 'a' \(4,\)"):
        writer.write("a", torch.zeros(4))
    writer.abort()


def test_reader_views_are_zero_copy_and_match(tmp_path):
    from safetensors.torch import save_file

    seed = int.from_bytes(os.urandom(4), "little")
    tensors = {k: t for k, t in _random_tensors(seed).items() if not k.endswith("u8")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = ModelReader(tmp_path)
    try:
        for name, t in tensors.items():
            reader.prefetch(name)
            v = reader.view(name)
            assert torch.equal(v, t), f"{name} seed={seed}"
            assert reader.view(name).data_ptr() == v.data_ptr(), "views of one tensor should share the mapping"
            del v
            reader.release(name)
            assert torch.equal(reader.view(name), t), f"{name} after release (seed={seed})"
    finally:
        reader.close()
