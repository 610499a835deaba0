"""The non-finite guard on parallel.backend=megatron, the HF trainer's policy (tests/test_reliability.py): a step
whose loss or grad norm is NaN/inf applies no update on any rank and is counted (`nonfinite_skipped`);
train.max_nonfinite_steps in a row stop the run with exit 2; no checkpoint while the last step was non-finite, none
and no final model with a non-finite parameter.

The loop logic (run_megatron_steps, GRPO's MegatronPolicy) runs here against a stand-in backend; the backend's skip and
the saves run under torchrun (2 processes, gloo, the CPU shims of tests/parallel/megatron_cpu_shims.py): one launch of
tests/parallel/nonfinite_megatron_worker.py (TP=2 and DP=2 with the distributed optimizer, faults on rank 1 only) and
one SFT run through the CLI with a learning rate that blows up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nova_rt.config import build_config
from nova_rt.errors import NonFiniteError
from nova_rt.telemetry import Telemetry
from tests.reliability_helpers import ROOT, tiny_config

NAN = float("nan")


class _Backend:
    """What the megatron loops drive of MegatronTrainer; train_step returns the next loss of `losses` (grad norm 1,
    or NaN with a non-finite loss) and skips the update when it is not finite, as MegatronTrainer does."""

    def __init__(self, losses: list[float]):
        self.losses, self.updates, self.update_skipped = list(losses), 0, False
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.0}])

    def set_lr(self, lr: float) -> None:
        self.optimizer.param_groups[0]["lr"] = lr

    def train_step(self, micro_batches, loss_fn=None, **kwargs) -> dict:
        loss = self.losses.pop(0)
        self.update_skipped = not math.isfinite(loss)
        self.updates += not self.update_skipped
        return {"loss": loss, "grad_norm": NAN if self.update_skipped else 1.0, "tokens": 4}


def _cfg(max_steps: int, **checkpoint):
    return build_config({"train": {"max_steps": max_steps, "max_nonfinite_steps": 3},
                         "checkpoint": {"every": 0, **checkpoint}})


def _run(tmp_path: Path, losses: list[float], max_steps: int, **checkpoint) -> tuple[_Backend, list[dict]]:
    from tests.megatron_steps import run_megatron_steps

    backend, tel = _Backend(losses), Telemetry(tmp_path, enabled=True, tensorboard=False, progress_bar=False)
    try:
        run_megatron_steps(_cfg(max_steps, **checkpoint), backend, tel, tmp_path, 0, lambda step: [])
    finally:
        tel.close(plot=False)
        rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return backend, rows


def test_megatron_loop_counts_nonfinite_steps_and_stops_after_n_in_a_row(tmp_path):
    with pytest.raises(NonFiniteError, match=r"steps 4-6: loss or gradient norm non-finite 3 steps in a row "
                                             r"\(train.max_nonfinite_steps=3\); stopped without saving"):
        _run(tmp_path, [1.0, NAN, 1.0, NAN, NAN, NAN, 1.0], max_steps=10)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # the step that stops the run is not logged (as the HF path)
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["nonfinite"] == ["loss", "grad_norm"]


def test_megatron_run_ending_on_a_nonfinite_step_writes_no_final_model(tmp_path):
    with pytest.raises(NonFiniteError, match="step 3: the run ended with 1 non-finite step"):
        _run(tmp_path / "a", [1.0, 1.0, NAN], max_steps=3)
    backend, rows = _run(tmp_path / "b", [1.0, 1.0, NAN], max_steps=3, save_final=False)
    assert backend.updates == 2 and rows[-1]["nonfinite_skipped"] == 1


def test_megatron_guard_continues_the_count_of_the_resumed_checkpoint(tmp_path):
    from nova_rt.backends.megatron import megatron_guard

    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "nonfinite_total": 2}))
    assert megatron_guard(_cfg(8), tmp_path, 4).total == 2
    assert megatron_guard(_cfg(8), tmp_path, 0).total == 0


def test_grpo_megatron_policy_skips_counts_and_refuses_checkpoints(tmp_path):
    from nova_rt.backends.megatron import MegatronPolicy

    backend = _Backend([1.0, NAN, NAN, NAN])
    policy = MegatronPolicy(_cfg(8), backend, tmp_path, 1.0)
    assert policy.train_step([], None)["nonfinite_skipped"] == 0
    assert policy.train_step([], None)["nonfinite_skipped"] == 1
    assert policy.save_checkpoint({"grpo": {}}) is None
    with pytest.raises(NonFiniteError, match="ended with 1 non-finite step"):
        policy.guard.refuse_model(policy.step)
    policy.train_step([], None)
    with pytest.raises(NonFiniteError, match=r"steps 2-4: loss or gradient norm non-finite 3 steps in a row"):
        policy.train_step([], None)
    assert backend.updates == 1 and not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- under torchrun
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           *argv], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nova_rt.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", seed=0, hidden=32, layers=2, heads=2,
                           kv_heads=2, intermediate=64)


@pytest.mark.distributed
def test_megatron_backend_skips_nonfinite_steps_on_every_rank(tmp_path, tiny_dir):
    """Per step and rank: a fault on rank 1 alone (an inf loss with finite gradients under TP=2, NaN gradients under
    DP=2 with the distributed optimizer) skips the update on both ranks: parameters and Adam's step count unchanged;
    the next finite step updates again. Then lr inf makes the parameters non-finite: a checkpoint and the final model
    are refused on both ranks and nothing is written."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(tiny_dir), "out": str(tmp_path)}))
    proc = _torchrun(str(ROOT / "tests" / "parallel" / "nonfinite_megatron_worker.py"), str(spec))
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = {"tp2": (["sft", "inf_loss", "nan", "sft"], [1, 1, 1, 2, 3]),
                "dp2_distopt": (["sft", "nan", "sft"], [1, 1, 2, 3])}  # step kinds, then Adam's step count
    for layout, (kinds, adam_steps) in expected.items():
        ranks = json.loads((tmp_path / f"{layout}.json").read_text())
        for rank, steps in enumerate(ranks):
            where = f"{layout} rank {rank}"
            assert [s["kind"] for s in steps] == [*kinds, "lr_inf"], where
            assert [s["skipped"] for s in steps[:-1]] == [k != "sft" for k in kinds], where
            assert [s["unchanged"] for s in steps[:-1]] == [k != "sft" for k in kinds], where
            assert all(s["finite"] for s in steps[:-1]), where
            assert [s["adam_step"] for s in steps] == adam_steps, where
            last = steps[-1]
            assert not last["skipped"] and not last["finite"], where  # finite grads: the update ran and overflowed
            assert last["checkpoint"].startswith("step 5: a model parameter is non-finite; checkpoint not written")
            assert last["final"].startswith("step 100: a model parameter is non-finite; neither a checkpoint nor")
            assert last["files"] == [], where
        assert ranks[1][1]["loss"] == math.inf or math.isnan(ranks[1][1]["loss"]), layout  # the fault was rank 1's


@pytest.mark.distributed
def test_megatron_diverging_sft_run_stops_with_exit_2_and_keeps_only_finite_checkpoints(tmp_path, tiny_dir):
    """tests/test_reliability.py's diverging run (lr 1e30: NaN from step 2) on the megatron backend, TP=2."""
    cfg = tiny_config(tmp_path, optim={"lr": 1e30}, train={"max_steps": 8}, model={"path": str(tiny_dir)},
                      parallel={"backend": "megatron", "tensor_parallel": 2})
    proc = _torchrun(str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), "--config", str(cfg))
    err = proc.stderr
    assert proc.returncode == 1 and err.count("exitcode  : 2 ") == 2, err[-4000:]
    stop = "nova_rt: training stopped: steps 2-4: loss or gradient norm non-finite 3 steps in a row"
    assert [ln for ln in err.splitlines() if ln.startswith("nova_rt: training")] == [
        f"{stop} (train.max_nonfinite_steps=3); stopped without saving. Last checkpoint: "
        f"{tmp_path / 'run' / 'checkpoints' / 'step_00000001'}. Lower optim.lr or check the data, then rerun to "
        "resume."], err[-4000:]
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert json.loads((run / "checkpoints" / "step_00000001" / "meta.json").read_text())["nonfinite_total"] == 0
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and [r["nonfinite_skipped"] for r in recs] == [0, 1, 2]
    assert recs[0]["loss"] is not None and recs[1]["loss"] is None and "loss" in recs[1]["nonfinite"]
