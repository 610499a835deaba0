"""benchmarks/merge_scale.py (`bench_merge.py --scale`): Qwen2.5 shapes, the sharded random checkpoints (layout,
reproducibility), the process-tree measurements (RSS, I/O, the RSS cap), page-cache eviction, the disk check, and a
tiny-scale run of the whole code path with nova_rt and the plain-copy I/O bound (mergekit is left out: seconds)."""

from __future__ import annotations

import json
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks import merge_scale


def test_shapes_are_qwen2_5s():
    """Parameter counts of the published Qwen2.5 checkpoints; 7B has an untied lm_head, 3B ties it."""
    counts = {"0.5b": 494_032_768, "1.5b": 1_543_714_304, "3b": 3_085_938_688, "7b": 7_615_616_512}
    for scale, count in counts.items():
        shapes = merge_scale.qwen_shapes(scale)
        assert sum(merge_scale._numel(shape) for shape in shapes.values()) == count, scale
    shapes_7b = merge_scale.qwen_shapes("7b")
    assert shapes_7b["lm_head.weight"] == (152064, 3584)
    assert shapes_7b["model.layers.27.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes_7b["model.layers.0.mlp.down_proj.weight"] == (3584, 18944)
    assert "lm_head.weight" not in merge_scale.qwen_shapes("3b")
    assert [len(names) for names in merge_scale.shard_plan(shapes_7b, 5 * 10**9)] == [104, 122, 112, 1]


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for name, fname in index["weight_map"].items():
        with safe_open(str(model_dir / fname), "pt") as handle:
            out[name] = handle.get_tensor(name)
    return out


def test_models_are_sharded_bf16_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(merge_scale, "CHUNK", 1000)  # several chunks per tensor
    dirs = merge_scale.write_models("tiny", tmp_path / "a", seed=3, shard_bytes=40_000)
    shapes = merge_scale.qwen_shapes("tiny")
    files = sorted(path.name for path in dirs[0].glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    base, ft1 = _load(dirs[0]), _load(dirs[1])
    assert {name: tuple(t.shape) for name, t in base.items()} == shapes
    assert all(t.dtype == torch.bfloat16 for t in base.values())
    index = json.loads((dirs[0] / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2 * sum(merge_scale._numel(s) for s in shapes.values())
    delta = (ft1["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float())
    assert 0.001 < delta.std() < 0.006 and base["model.embed_tokens.weight"].float().std() > 0.015
    assert base["model.norm.weight"].float().mean().item() == pytest.approx(1.0, abs=0.01)
    stamp = (dirs[0] / files[0]).stat().st_mtime_ns
    assert merge_scale.write_models("tiny", tmp_path / "a", seed=3, shard_bytes=40_000) == dirs
    assert (dirs[0] / files[0]).stat().st_mtime_ns == stamp  # a complete set is reused, not rewritten
    again = merge_scale.write_models("tiny", tmp_path / "b", seed=3, shard_bytes=40_000)
    other = merge_scale.write_models("tiny", tmp_path / "c", seed=4, shard_bytes=40_000)
    for role_dir, again_dir, other_dir in zip(dirs, again, other):
        for fname in files:
            assert (role_dir / fname).read_bytes() == (again_dir / fname).read_bytes()
            assert (role_dir / fname).read_bytes() != (other_dir / fname).read_bytes()
    assert not list(tmp_path.glob(".*partial"))


_CHILD = """import os, subprocess, sys
block = bytearray(int(sys.argv[1]) << 20)  # zero-filled: every page touched
with open(sys.argv[2], "wb") as f:
    f.write(os.urandom(8 << 20))
    f.flush()
    os.fsync(f.fileno())
if len(sys.argv) > 3:  # a grandchild holding its own memory at the same time
    subprocess.run([sys.executable, "-c", "import time; b = bytearray(150 << 20); time.sleep(1.0)"])
"""


def test_measure_counts_the_process_tree(tmp_path):
    stats = merge_scale.measure([sys.executable, "-c", _CHILD, "200", str(tmp_path / "x"), "tree"])
    assert stats["rc"] == 0 and "error" not in stats
    assert stats["maxrss"] >= 200 << 20  # the largest single process
    assert stats["tree_rss_peak"] >= 340 << 20  # child (200 MiB) + grandchild (150 MiB) alive together
    assert stats["tree_anon_peak"] >= 340 << 20  # bytearrays: anonymous memory
    assert stats["tree_anon_shmem_peak"] >= stats["tree_anon_peak"]
    assert stats["wchar"] >= 8 << 20 and stats["write_bytes"] >= 8 << 20
    assert stats["wall_s"] >= 1.0 and 0 < stats["user_s"] + stats["sys_s"]


def test_measure_separates_mapped_file_pages_from_anonymous_memory(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\x01" * (64 << 20))
    child = ("import mmap, sys, time\nf = open(sys.argv[1], 'rb')\n"
             "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
             "sum(m[i] for i in range(0, len(m), 4096))\ntime.sleep(0.5)")
    stats = merge_scale.measure([sys.executable, "-c", child, str(path)])
    assert stats["tree_rss_peak"] - stats["tree_anon_shmem_peak"] >= 60 << 20
    assert stats["tree_anon_shmem_peak"] < 60 << 20


def test_measure_counts_shared_anonymous_memory_as_unreclaimable():
    """mmap(-1) is MAP_SHARED | MAP_ANONYMOUS (shmem, like nova_rt's output arena): not RssAnon, not a file page."""
    child = ("import mmap, time\nm = mmap.mmap(-1, 96 << 20)\nblock = b'\\x01' * (1 << 20)\n"
             "for _ in range(96):\n    m.write(block)\ntime.sleep(0.5)")
    stats = merge_scale.measure([sys.executable, "-c", child])
    assert stats["tree_anon_shmem_peak"] - stats["tree_anon_peak"] >= 90 << 20


def test_measure_kills_a_tree_past_the_rss_cap(tmp_path):
    stats = merge_scale.measure([sys.executable, "-c", "import time; b = bytearray(400 << 20); time.sleep(30)"],
                                rss_cap=200 << 20)
    assert stats["error"].startswith("killed: tree anonymous + shmem RSS") and stats["wall_s"] < 20


def _fs_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, fs = line.split()[1], line.split()[2]
        if str(path.resolve()).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fs
    return kind


def test_evict_drops_our_files_from_the_page_cache(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\x01" * (4 << 20))
    path.read_bytes()
    assert merge_scale.cached_fraction([path]) > 0.9
    merge_scale.evict([path])
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages cannot be evicted")
    assert merge_scale.cached_fraction([path]) < 0.1


def _args(tmp_path, **overrides) -> Namespace:
    args = dict(scale="tiny", methods="linear,slerp", work_dir=str(tmp_path / "work"), keep=False, seed=0,
                shard_gb=4e-5, rss_cap_gb=8.0, timeout=300.0, nova_python=sys.executable, mergekit="",
                skip_mergekit=True, mergekit_shard_size="1B", tensors=None, dtype="float32", machine="test",
                out=str(tmp_path / "res.json"))
    return Namespace(**{**args, **overrides})


def test_tiny_scale_run_writes_rows_plot_and_cleans_up(tmp_path):
    json_path = merge_scale.run(_args(tmp_path))
    result = json.loads(json_path.read_text())
    assert result["scale"] == "tiny" and result["disk_needed"] > 7 * result["model_bytes"]
    rows = {(row["method"], row["tool"]): row for row in result["rows"]}
    assert set(rows) == {(m, t) for m in ("linear", "slerp") for t in ("copy buffered", "copy O_DIRECT", "nova_rt")}
    for (method, _tool), row in rows.items():
        assert "error" not in row, row
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 5 and row["cached_frac_before"] < 0.5
        assert row["models_read"] == (3 if method == "linear" else 2)
        assert row["out_bytes"] >= result["model_bytes"]  # the merged model (or the copy of its size)
    assert rows[("linear", "nova_rt")]["x_io_bound"] > 0
    assert json_path.with_suffix(".png").stat().st_size > 10_000
    assert not (tmp_path / "work" / "qwen2.5-tiny").exists()  # generated models removed without --keep
    assert not (tmp_path / "work" / "work_tiny").exists()


def test_tensors_regex_keeps_only_the_matching_tensors(tmp_path):
    shapes = merge_scale.qwen_shapes("7b", "embed|lm_head")
    assert shapes == {"model.embed_tokens.weight": (152064, 3584), "lm_head.weight": (152064, 3584)}
    assert merge_scale.required_bytes("7b", "embed|lm_head")[0] == 2 * 2 * 152064 * 3584
    dirs = merge_scale.write_models("tiny", tmp_path / "m", shard_bytes=10**6, tensors="norm")
    assert all(name.endswith("norm.weight") for name in _load(dirs[0]))
    with pytest.raises(SystemExit, match="matches no tensor"):
        merge_scale.qwen_shapes("tiny", "no_such_tensor")


def test_disk_check_refuses_a_scale_that_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(merge_scale.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 90, 10**9))
    with pytest.raises(SystemExit, match=r"--scale 7b: needs 108\.\d GB free .* only 1\.0 GB"):
        merge_scale.run(_args(tmp_path, scale="7b"))
