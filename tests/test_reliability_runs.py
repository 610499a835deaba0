"""A run directory belongs to one run: a second run in a directory a running run holds exits 2 naming its pid (and the
lock goes with a SIGKILLed process), and a run resumes only checkpoints written by its own stage, model, data and
config (nova_rt.run_lock, nova_rt.provenance); checkpoint.resume=force overrides with a warning, a longer
train.max_steps resumes as before, a checkpoint of an older version resumes with a warning. A refused run leaves the
previous run's config.json. The megatron backend records and checks the same under torchrun (gloo, CPU shims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nova_rt.checkpoint import write_manifest
from tests.reliability_helpers import ROOT, chat_rows, run_cli, tiny_config, write_jsonl

HOLD = "import sys, time; from nova_rt import run_lock; run_lock.hold(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(600)"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds run_dir's lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _newest(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_????????"))[-1]


# ----------------------------------------------------------------------------------------------- the lock
def test_second_run_in_a_running_runs_dir_exits_2_naming_its_pid_and_a_killed_run_releases_it(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"max_steps": 100000}, checkpoint={"every": 1, "keep_last": 2,
                                                                          "save_final": False})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nova_rt.train", "--config", str(cfg)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        # a complete checkpoint (its manifest is written last), not only the first one's step_N.tmp
        while not any((run / "checkpoints").glob("step_????????/manifest.json")) and proc.poll() is None:
            assert time.time() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.2)
        assert proc.poll() is None
        code, err = run_cli(capsys, "--config", str(cfg), "--set", "optim.lr=0.01")
        assert code == 2 and err.startswith(f"nova_rt: error: run.dir {run} is in use by another run (pid {proc.pid} "
                                            "on host "), err
        assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.001  # the running run's, kept
    finally:
        proc.kill()  # SIGKILL: the process holds the lock no more
        proc.wait()
    last = int(_newest(run).name[len("step_"):])
    code, err = run_cli(capsys, "--config", str(cfg), "--set", f"train.max_steps={last + 1}")
    assert code == 0, err
    assert _steps(run)[-1] == last + 1


def test_a_run_inside_a_directory_another_run_holds_is_refused_and_the_own_process_may(tmp_path):
    from nova_rt import run_lock

    outer = tmp_path / "pipeline"
    proc = _holder(outer)
    try:
        with pytest.raises(run_lock.RunDirInUse, match=rf"is in use by another run \(pid {proc.pid} on host "):
            run_lock.hold(outer)
        with pytest.raises(run_lock.RunDirInUse, match=rf"run.dir {outer / 'sft'} lies inside {outer}, the run "
                                                       rf"directory of a running run \(pid {proc.pid} on host "):
            run_lock.hold(outer / "sft")
        assert not (outer / "sft").exists()
    finally:
        proc.kill()
        proc.wait()
    own = tmp_path / "own"
    try:  # the pipeline holds its run.dir while its stages take the directories inside it, in the same process
        run_lock.hold(own)
        run_lock.hold(own / "sft" / "math")
        run_lock.hold(own)
        assert run_lock.held(own) and run_lock.held(own / "sft" / "math")
    finally:
        run_lock.release(own / "sft" / "math")
        run_lock.release(own)
    proc = _holder(own)  # released: another process may take it
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------------------------- provenance
def test_a_dpo_checkpoint_in_an_sft_run_dir_is_refused_naming_both_stages(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["train.max_steps=2", "checkpoint.every=1", "data.eval_files=[]", "train.eval_every=0",
            "train.num_threads=1", "logging.tensorboard=false", "logging.plot=false", "checkpoint.save_final=false"]
    code, err = run_cli(capsys, "--config", str(ROOT / "configs" / "tiny_dpo.yaml"), "--set", f"run.dir={run}",
                        *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    config_before, ckpt = (run / "config.json").read_text(), _newest(run)
    cfg = tiny_config(tmp_path, model={"tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2,
                                                "intermediate": 128}}, train={"max_steps": 3})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2 and err.splitlines()[0] == (
        f"nova_rt: checkpoint error: {ckpt} cannot be resumed by this run: it was "
        "written by stage dpo, this run is sft. Start it in another run.dir, or set checkpoint.resume=force to "
        "resume anyway"), err
    assert (run / "config.json").read_text() == config_before


def test_resume_refuses_another_lr_or_changed_data_unless_forced(tmp_path, capsys, caplog):
    cfg = tiny_config(tmp_path, checkpoint={"every": 1, "save_final": False})
    run, data = tmp_path / "run", tmp_path / "chat.jsonl"
    assert run_cli(capsys, "--config", str(cfg))[0] == 0
    ckpt, config_before = _newest(run), (run / "config.json").read_text()

    code, err = run_cli(capsys, "--config", str(cfg), "--set", "optim.lr=0.0001", "--set", "train.max_steps=3")
    assert code == 2 and err.splitlines()[0] == (
        f"nova_rt: checkpoint error: {ckpt} cannot be resumed by this run: optim.lr: 0.001 there, 0.0001 here. Start "
        "it in another run.dir, or set checkpoint.resume=force to resume anyway"), err
    assert (run / "config.json").read_text() == config_before and _steps(run) == [1, 2]

    write_jsonl(data, chat_rows()[:6])  # the data file replaced with half its rows
    code, err = run_cli(capsys, "--config", str(cfg), "--set", "train.max_steps=3")
    assert code == 2 and f"cannot be resumed by this run: data file {data} changed since the checkpoint (sha256 " \
        in err and " bytes there, " in err, err
    assert (run / "config.json").read_text() == config_before and _steps(run) == [1, 2]

    caplog.clear()
    code, err = run_cli(capsys, "--config", str(cfg), "--set", "optim.lr=0.0001", "--set", "train.max_steps=3",
                        "--set", "checkpoint.resume=force")
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "checkpoint.resume=force" in r.getMessage()]
    assert len(warned) == 1 and f"resuming from {ckpt} although optim.lr: 0.001 there, 0.0001 here; data file " \
        f"{data} changed since the checkpoint" in warned[0], warned
    assert _steps(run) == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.0001  # the run that went ahead


def test_a_longer_max_steps_resumes_and_an_older_checkpoint_resumes_with_a_warning(tmp_path, capsys, caplog):
    cfg = tiny_config(tmp_path, checkpoint={"every": 1, "save_final": False})
    run = tmp_path / "run"
    assert run_cli(capsys, "--config", str(cfg))[0] == 0
    saved = torch.load(_newest(run) / "state.pt", weights_only=True)["provenance"]
    assert saved["stage"] == "sft" and saved["model"] == "tiny:llama" and saved["config"]["optim.lr"] == 0.001
    assert [d["path"] for d in saved["data"]] == [str(tmp_path / "chat.jsonl")] and len(saved["data"][0]["sha256"]) \
        == 64 and "train.max_steps" not in saved["config"] and "checkpoint.every" not in saved["config"]

    caplog.clear()
    code, err = run_cli(capsys, "--config", str(cfg), "--set", "train.max_steps=3")
    assert code == 0, err
    assert _steps(run) == [1, 2, 3] and not [r for r in caplog.records if r.name == "nova_rt.provenance"]

    ckpt = _newest(run)  # as an older nova_rt wrote it: no provenance
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["provenance"]
    torch.save(state, ckpt / "state.pt")
    write_manifest(ckpt)
    caplog.clear()
    code, err = run_cli(capsys, "--config", str(cfg), "--set", "train.max_steps=4")
    assert code == 0, err
    assert _steps(run) == [1, 2, 3, 4]
    assert any(f"{ckpt} records no provenance (written by an older nova_rt)" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------------------------- megatron
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nova_rt.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", seed=0, hidden=32, layers=2, heads=2,
                           kv_heads=2, intermediate=64)


def _megatron(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), "--config", str(cfg), *sets],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _both_ranks_exit_2(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr
    assert proc.returncode == 1 and err.count("exitcode  : 2 ") == 2, err[-4000:]
    ours = [ln for ln in err.splitlines() if ln.startswith("nova_rt: ")]
    assert len(ours) == 2, err[-4000:]
    return ours[0]


@pytest.mark.distributed
def test_megatron_run_dir_lock_and_provenance_under_torchrun(tmp_path, tiny_dir):
    """TP=2: a run in a held directory exits 2 on both ranks naming the holder; a run's checkpoints record its
    provenance in meta.json (covered by the manifest) and a rerun with another lr is refused on both ranks."""
    cfg = tiny_config(tmp_path, model={"path": str(tiny_dir)}, checkpoint={"every": 1, "save_final": False},
                      parallel={"backend": "megatron", "tensor_parallel": 2})
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        line = _both_ranks_exit_2(_megatron(cfg))
        assert line.startswith(f"nova_rt: error: run.dir {run} is in use by another run (pid {holder.pid} on host")
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "config.json").exists()

    proc = _megatron(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = _newest(run)
    saved = json.loads((ckpt / "meta.json").read_text())["provenance"]
    assert saved["stage"] == "sft" and saved["model"] == str(tiny_dir) and saved["config"]["optim.lr"] == 0.001
    assert saved["data"][0]["path"] == str(tmp_path / "chat.jsonl") and len(saved["data"][0]["sha256"]) == 64
    assert "meta.json" in json.loads((ckpt / "manifest.json").read_text())["files"]

    line = _both_ranks_exit_2(_megatron(cfg, "optim.lr=0.0001", "train.max_steps=3"))
    assert line == (f"nova_rt: checkpoint error: {ckpt} cannot be resumed by this run: optim.lr: 0.001 there, 0.0001 "
                    "here. Start it in another run.dir, or set checkpoint.resume=force to resume anyway")
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.001
