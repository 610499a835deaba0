"""Asynchronous GRPO (grpo.async_rollout: ranks, max_staleness; nova_rt.stages.grpo.async_) under torchrun with
gloo: one trainer and one rollout rank on a tiny Llama. max_staleness 0 is the colocated loop bit for bit (metrics,
eval, final weights); k = 1 and 2 train with batch b sampled by version b - k; a SIGKILLed rollout rank stops every
rank within 60 s, and a rerun resumes from the last checkpoint and trains the prompts an uninterrupted run trains; a
rollout rank's reward error is one line naming the rank (exit 2); the config mistakes are exit 2 naming the key."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nova_rt.train import main
from tests.parallel.run_helpers import ROOT, clean_env, read_metrics, read_weights

TINY_GRPO = ROOT / "configs" / "tiny_grpo.yaml"
TINY_ASYNC = ROOT / "configs" / "tiny_grpo_async.yaml"
COMPARED = ("loss", "grad_norm", "reward_mean", "reward_std", "kl", "entropy", "response_len", "ptx_kl",
            "ratio_mean", "clip_frac", "eval_accuracy")


def _args(config: Path, run_dir: Path, *sets: str) -> list[str]:
    sets = (f"run.dir={run_dir}", "train.num_threads=1", "logging.tensorboard=false", *sets)
    return ["--config", str(config), *[x for kv in sets for x in ("--set", kv)]]


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "nova_rt.train", *args]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
def test_staleness_0_is_the_colocated_loop(tmp_path):
    colocated, asynchronous = tmp_path / "colocated", tmp_path / "async"
    r = _run([sys.executable, "-m", "nova_rt.train", *_args(TINY_GRPO, colocated)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(_torchrun(_args(TINY_GRPO, asynchronous, "grpo.async_rollout.ranks=1")))
    assert r.returncode == 0, r.stderr[-3000:]
    expected, got = read_metrics(colocated), read_metrics(asynchronous)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert {k: a[k] for k in COMPARED if k in a} == {k: b[k] for k in COMPARED if k in b}, a["step"]
        assert b["staleness_max"] == b["staleness_mean"] == 0.0
        for key in ("rollout_wait_s", "producer_wait_s", "weight_sync_s", "rollout_gen_s"):
            assert b[key] >= 0.0
    assert "eval_accuracy" in got[0]
    weights, async_weights = read_weights(colocated / "final"), read_weights(asynchronous / "final")
    assert all(weights[key].equal(async_weights[key]) for key in weights)


@pytest.mark.distributed
@pytest.mark.parametrize("staleness", [2])  # 1: the kill test's reference run
def test_bounded_staleness_trains(tmp_path, staleness):
    run_dir = tmp_path / "run"
    r = _run(_torchrun(_args(TINY_ASYNC, run_dir, f"grpo.async_rollout.max_staleness={staleness}",
                             "train.max_steps=6", "checkpoint.every=0", "grpo.eval.every=0")))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    # batch b is sampled by version max(0, b - k): the rollout rank runs k steps ahead, never more
    assert [m["staleness_max"] for m in metrics] == [float(min(b, staleness)) for b in range(6)]
    for m in metrics:
        assert 0.0 < m["is_weight_mean"] and 0.0 <= m["is_masked_frac"] <= 1.0
    assert any(m["grad_norm"] > 0 for m in metrics)
    assert (run_dir / "final" / "config.json").exists()


def _rank_pid(parent: int, rank: int) -> int | None:
    """The torchrun worker of `parent` (the launcher's pid) with RANK=rank."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.distributed
def test_killed_rollout_rank_stops_every_rank_and_the_rerun_trains_the_same_prompts(tmp_path):
    steps = 16
    sets = (f"train.max_steps={steps}", "checkpoint.every=2", "grpo.eval.every=0", "grpo.ptx.coef=0")
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    r = _run(_torchrun(_args(TINY_ASYNC, reference, *sets)))  # max_staleness 1, uninterrupted
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["staleness_max"] for m in read_metrics(reference)] == [0.0] + [1.0] * (steps - 1)
    command = _torchrun(_args(TINY_ASYNC, run_dir, *sets))
    launcher = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "checkpoints").glob("step_*/state.pt")):
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "rank" in stderr and ("SIGKILL" in stderr or "stopped answering" in stderr), stderr[-3000:]
    steps_before = [m["step"] for m in read_metrics(run_dir)]
    assert steps_before[-1] < steps, "the run ended before the kill"
    r = _run(command)  # the same command resumes from the last checkpoint
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, expected = read_metrics(run_dir), read_metrics(reference)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [m["prompt_crc32"] for m in resumed] == [m["prompt_crc32"] for m in expected]


@pytest.mark.distributed
def test_rollout_rank_reward_error_is_one_line_naming_the_rank(tmp_path):
    rewards = tmp_path / "bad_reward.py"
    rewards.write_text("def reward(completions, samples):\n    return [float('nan')] * len(completions)\n")
    r = _run(_torchrun(_args(TINY_ASYNC, tmp_path / "run", "grpo.eval.every=0",  # the trainer never scores
                             f"grpo.rewards=[{{type: user, function: '{rewards}:reward'}}]")))
    err = r.stderr
    assert r.returncode == 1 and err.count("exitcode  : 2 ") == 2, err[-3000:]  # torchrun: 1; both ranks: 2
    lines = [line for line in err.splitlines() if line.startswith("nova_rt: error")]
    assert len(lines) == 1 and lines[0].startswith(f"nova_rt: error: rollout rank 1: RewardError: reward {rewards}:"
                                                   "reward returned nan for completion 0"), err[-3000:]
    assert "traceback : nova_rt: error: rollout rank 1: reward " in err  # the rollout rank's own line


@pytest.mark.parametrize("overrides, message", [
    (["grpo.async_rollout.max_staleness=-1"], "grpo.async_rollout.max_staleness: must be >= 0, got -1"),
    (["grpo.async_rollout.max_staleness=2"],
     "grpo.async_rollout.max_staleness=2 needs grpo.async_rollout.ranks > 0"),
    (["grpo.async_rollout.ranks=-1"], "grpo.async_rollout.ranks: must be >= 0, got -1"),
    (["grpo.async_rollout.ranks=1"],
     "grpo.async_rollout.ranks=1 leaves no trainer: the torchrun world has 1 rank(s)"),
])
def test_async_config_mistakes_exit_2_naming_the_key(tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--config", str(TINY_GRPO), "--set", f"run.dir={tmp_path / 'run'}"]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    (["parallel.backend=megatron"], "grpo.async_rollout.ranks=2: parallel.backend=megatron: megatron-core's "
                                    "parallel_state builds its groups over every rank of the default group, so the "
                                    "rollout ranks would be counted as data-parallel ranks; use parallel.backend=hf"),
    (["grpo.sampling.prompts_per_step=3"],
     "grpo.async_rollout.ranks=2: grpo.sampling.prompts_per_step=3 must divide by the rollout ranks"),
])
def test_async_refusals_name_the_key(overrides, message):
    """What the stage refuses when it starts (every rank raises the same ConfigError, exit 2), before torch.distributed
    starts: checked on the loaded config."""
    from nova_rt.config import load_config
    from nova_rt.errors import ConfigError
    from nova_rt.stages.grpo.async_ import check_async

    cfg = load_config(str(TINY_ASYNC), [*overrides, "grpo.async_rollout.ranks=2"])
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        check_async(cfg, 4)
    check_async(load_config(str(TINY_ASYNC), []), 2)
