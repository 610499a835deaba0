"""Data parallelism on CPU (gloo, 2 processes under torchrun): DDP and FSDP2 runs end with the same weights and the
same losses as a single-process run of the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _args(run_dir, extra=()):
    return ["-m", "nova_rt.train", "--config", str(ROOT / "configs" / "tiny_sft.yaml"),
            "--set", f"run.dir={run_dir}", "--set", "train.max_steps=2", "--set", "checkpoint.every=0",
            "--set", "train.global_batch=4", "--set", "train.micro_batch=1", "--set", "packing.max_tokens=256",
            "--set", "data.max_seq_len=256", "--set", "logging.tensorboard=false", "--set", "logging.plot=false",
            "--set", "train.num_threads=1", *extra]


def _env():
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _losses(d):
    return [json.loads(ln)["loss"] for ln in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("dp", ["ddp", "fsdp2"])
def test_data_parallel_matches_single_process(tmp_path, dp):
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, *_args(single)], check=True, cwd=ROOT, env=_env(), capture_output=True,
                   timeout=600)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        *_args(multi, ["--set", f"parallel.data_parallel={dp}"])],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ls, lm = _losses(single), _losses(multi)
    assert len(ls) == len(lm) == 2
    for a, b in zip(ls, lm):
        assert abs(a - b) <= 1e-5 * abs(a), (ls, lm)
    ws, wm = load_file(single / "final" / "model.safetensors"), load_file(multi / "final" / "model.safetensors")
    assert ws.keys() == wm.keys()
    for k in ws:
        rel = ((ws[k] - wm[k]).norm() / ws[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-5, (k, rel)
    from nova_rt.models.tiny import build_tiny_model

    init = build_tiny_model("llama", seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128).state_dict()
    assert not torch.equal(init["model.layers.0.mlp.up_proj.weight"], ws["model.layers.0.mlp.up_proj.weight"])
