"""The GRPO stage on grpo.rollout.engine=vllm, through the CLI (one process per run, as a user runs it).

- configs/tiny_grpo.yaml (rollouts, top-k KL, PTX, eval) on vLLM: the engine syncs before every rollout step
  (rollout_sync_s logged every step) and rollout_logprob_abs_diff stays <= 1e-3 (fp32) at every step;
- a run SIGKILLed after its step-2 checkpoint and rerun resumes at step 3 and logs the same rewards, response lengths,
  losses and KL as an uninterrupted run, and ends with the same weights (CPU, fp32: bit-identical);
- slow: configs/quickstart_grpo.yaml (SmolLM2-135M-Instruct) learns on vLLM: mean reward of its last 5 steps
  above that of the first 5 by more than 0.1.
Skipped where vllm is not importable.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.rollout import require_vllm  # noqa: E402

require_vllm()

ROOT = Path(__file__).resolve().parents[2]
TINY = "model.tiny={hidden: 128, layers: 2, heads: 2, kv_heads: 1, intermediate: 256}"  # head_dim 64 (vLLM CPU)


def _train(config: str, run_dir: Path, *overrides: str, threads: int = 1) -> subprocess.Popen:
    """The CLI run; `threads` 0: torch's default, every core (env without OMP_NUM_THREADS)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / config),
           "--set", f"run.dir={run_dir}", "--set", f"train.num_threads={threads}", "--set", "logging.tensorboard=false",
           "--set", "grpo.rollout.engine=vllm", *[x for o in overrides for x in ("--set", o)]]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, timeout: float = 1800) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_vllm_stage_syncs_every_step_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    steps = ["train.max_steps=4", "checkpoint.every=2", TINY]
    _finish(_train("tiny_grpo.yaml", tmp_path / "full", *steps))
    full = _metrics(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for r in full:
        assert r["rollout_sync_s"] > 0, r  # the step before changed the weights: synced
        assert r["rollout_logprob_abs_diff"] <= 1e-3, r
    killed = _train("tiny_grpo.yaml", tmp_path / "killed", *steps)
    ckpt = tmp_path / "killed" / "checkpoints" / "step_00000002"
    t0 = time.time()
    while not ckpt.exists() and killed.poll() is None and time.time() - t0 < 900:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed after its checkpoint"
    out = _finish(_train("tiny_grpo.yaml", tmp_path / "killed", *steps))
    assert "resumed from" in out, out[-3000:]
    resumed = _metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ra, rb in zip(full, resumed):
        for key in ("reward_mean", "response_len", "kl", "loss", "ptx_kl"):
            assert ra[key] == rb[key], f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"
    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"


def check_learned(rows: list[dict], max_steps: int) -> None:
    """Every step logged, mean reward of the last 5 steps > first 5 + 0.1, diff <= 1e-3, a sync every step."""
    assert len(rows) == max_steps
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.1, f"mean reward {first:.3f} (first 5 steps) -> {last:.3f} (last 5)"
    assert max(r["rollout_logprob_abs_diff"] for r in rows) <= 1e-3
    assert all(r["rollout_sync_s"] > 0 for r in rows[1:])


@pytest.mark.slow
def test_quickstart_grpo_learns_on_vllm(tmp_path):
    from nova_rt.config import load_config

    # every core, as the config itself runs (make test-vllm runs alone in CI): on 2 idle cores 7 min 32 s, where one
    # thread took ~12.5 min (2026-12-06; reward of the first 5 -> last 5 steps 0.388 -> 0.569 with 2 threads)
    _finish(_train("quickstart_grpo.yaml", tmp_path, "checkpoint.every=0", "checkpoint.save_final=false", threads=0),
            timeout=3600)
    check_learned(_metrics(tmp_path), load_config(ROOT / "configs" / "quickstart_grpo.yaml").train.max_steps)
