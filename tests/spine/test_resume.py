"""A run killed with SIGKILL and rerun with the same command ends with weights bit-identical to an uninterrupted
run (CPU), and a half-written checkpoint is never loaded."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _cmd(run_dir):
    return [sys.executable, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / "tiny_sft.yaml"),
            "--set", f"run.dir={run_dir}", "--set", f"train.max_steps={STEPS}", "--set", "checkpoint.every=2",
            "--set", "train.global_batch=2", "--set", "train.micro_batch=1", "--set", "packing.max_tokens=256",
            "--set", "data.max_seq_len=256", "--set", "logging.tensorboard=false", "--set", "logging.plot=false",
            "--set", "train.num_threads=1"]


def _env():
    env = dict(os.environ)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def _steps(run_dir: Path) -> int:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return 0
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(_cmd(a), check=True, cwd=ROOT, env=_env(), capture_output=True, timeout=600)
    kill_after = random.randint(2, STEPS - 1)
    proc = subprocess.Popen(_cmd(b), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _steps(b) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "final").exists()
    # A torn checkpoint from a killed save must be ignored (and a fake newer one with no state.pt too).
    torn = b / "checkpoints" / f"step_{STEPS + 10:08d}.tmp"
    torn.mkdir(parents=True, exist_ok=True)
    (torn / "model.pt").write_bytes(b"garbage")
    subprocess.run(_cmd(b), check=True, cwd=ROOT, env=_env(), capture_output=True, timeout=600)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume (killed after step {kill_after})"
    steps = [json.loads(ln)["step"] for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps
    la = [json.loads(ln)["loss"] for ln in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(ln)["loss"] for ln in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb
