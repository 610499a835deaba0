"""A full disk loses at most the steps since the last checkpoint, and says so: a write of run outputs that fails for
lack of space (ENOSPC / EDQUOT, or torch's and safetensors' wrapping of it) is exit 2 with one line naming the
directory, the bytes needed and free, and what a rerun does; no temporary file or directory is left; the final model
is written after a checkpoint of the last step, so a rerun after a failed final write only writes the model, and a
rerun after a failed checkpoint resumes from the previous one, bit-identically (nova_rt.disk).

The end-to-end cases run a tiny SFT on a small tmpfs (mounted here; skipped where mounting is not allowed) whose free
space a filler file sets to just below what the failing write needs."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from nova_rt.checkpoint import MANIFEST, CheckpointManager, verify_manifest
from nova_rt.disk import disk_writes, free_bytes
from nova_rt.distributed import DistInfo
from nova_rt.errors import DiskFullError
from tests.reliability_helpers import run_cli, tiny_config

KIB = 1024
MAX_STEPS = 3


def _leftovers(run: Path) -> list[str]:
    """Temporary files and directories of interrupted writes (step_N.tmp, .final.tmp-PID, *.tmp files)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or ".old" in p.name)


def _pages(path: Path) -> int:
    """Bytes that the files under `path` take on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


def _equal_weights(got_dir: Path, want: dict) -> bool:
    got = load_file(got_dir / "model.safetensors")
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------------------- the translation
@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EDQUOT, "Disk quota exceeded")])
def test_enospc_and_edquot_become_one_line_and_the_temporary_files_go(tmp_path, code, reason):
    tmp = tmp_path / "step_00000002.tmp"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"partial")
    with pytest.raises(DiskFullError) as info:
        with disk_writes(tmp_path, "the checkpoint of step 2", needed=3 * 2**20, cleanup=[tmp],
                         then="free space, then rerun"):
            raise OSError(code, os.strerror(code), str(tmp / "model.pt"))
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: {reason} writing the checkpoint of step 2: needs about 3,145,728 bytes "
                              "(3.0 MiB), ") and message.endswith(" free; free space, then rerun"), message
    assert "\n" not in message and not tmp.exists()
    needed, free = _numbers(message)
    assert needed == 3 * 2**20 and abs(free - free_bytes(tmp_path)) < 2**24


def test_torch_and_safetensors_wrappings_count_only_when_the_disk_is_full(tmp_path):
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(DiskFullError, match="No space left on device writing x: needs about"):  # needs > free
        with disk_writes(tmp_path, "x", needed=free_bytes(tmp_path) + 2**30):
            raise torch_error
    with pytest.raises(RuntimeError, match="inline_container"):  # plenty of space: another cause, left as it is
        with disk_writes(tmp_path, "x", needed=10):
            raise torch_error
    safetensors_error = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(DiskFullError, match="No space left on device writing x"):
        with disk_writes(tmp_path, "x", needed=10):
            raise safetensors_error
    with pytest.raises(DiskFullError, match="Disk quota exceeded writing x: needs about 1,122 bytes"):
        with disk_writes(tmp_path, "x", needed=1122):
            raise Exception("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    with pytest.raises(PermissionError):  # not a full disk: untouched, the temporary files too
        with disk_writes(tmp_path, "x", cleanup=[tmp_path]):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert tmp_path.exists()


def test_checkpoint_that_fills_the_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, DistInfo(), keep_last=1)
    model, optim = {"w": torch.zeros(1000)}, {"state": {0: {"exp_avg": torch.zeros(1000)}}}
    manager.save(1, model, optim, {"trainer_step": 1})
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if Path(path).name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError) as info:
        manager.save(2, model, optim, {"trainer_step": 2})
    assert str(info.value).startswith(f"{manager.root}: No space left on device writing the checkpoint of step 2: "
                                      "needs about 8,0")  # two 4,000-byte tensors and the state
    assert str(info.value).endswith("free space, then rerun to resume from step_00000001 (step 1), which is intact")
    assert [p.name for p in manager.root.iterdir()] == ["step_00000001"]
    assert verify_manifest(manager.root / "step_00000001", "state.pt") is None


def test_cli_names_the_run_dir_when_metrics_fill_the_disk(tmp_path, capsys, monkeypatch):
    from nova_rt.telemetry import Telemetry

    def log(self, step, metrics):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Telemetry, "log", log)
    cfg = tiny_config(tmp_path, train={"max_steps": 1})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2, err
    assert _error_line(err).startswith(f"nova_rt: disk full: {tmp_path / 'run'}: No space left on device writing "
                                       "the run's outputs: needs more than the "), err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------- megatron
def test_megatron_final_is_written_after_a_checkpoint_of_the_last_step(tmp_path, monkeypatch):
    """MegatronPolicy.save_final on a stand-in backend: the last step's checkpoint (with the stage's extra state)
    exists before the final model is written; a rerun resumed at that step writes only the model; with
    checkpoint.resume=false an old checkpoint of the step is written again."""
    from nova_rt.backends import megatron
    from nova_rt.config import build_config
    from nova_rt.parallel import checkpoint as mckpt

    calls = []

    def save(backend, root, step, extra=None, keep_last=2, meta=None):
        calls.append(("checkpoint", step, extra))
        (root / f"step_{step:08d}").mkdir(parents=True, exist_ok=True)
        (root / f"step_{step:08d}" / "DONE").write_text("")
        return root / f"step_{step:08d}"

    def save_final(cfg, info, backend, tokenizer, run_dir, step=None):
        calls.append(("final", step, (run_dir / "checkpoints" / f"step_{step:08d}" / "DONE").exists()))
        return str(run_dir / "final")

    monkeypatch.setattr(mckpt, "save", save)
    monkeypatch.setattr(megatron, "save_megatron_final", save_final)
    backend = SimpleNamespace(set_lr=lambda lr: None, update_skipped=False,
                              train_step=lambda mbs, fn=None, **kw: {"loss": 1.0, "grad_norm": 1.0})

    def policy(resume: bool = True, step: int = 0):
        cfg = build_config({"train": {"max_steps": MAX_STEPS}, "checkpoint": {"every": 0, "resume": resume}})
        p = megatron.MegatronPolicy(cfg, backend, tmp_path, 1.0)
        p.step = step
        return p

    first = policy()
    for _ in range(MAX_STEPS):
        first.train_step([], None)
    first.save_final(None, {"grpo": {"sampler": 1}})
    assert calls == [("checkpoint", 3, {"grpo": {"sampler": 1}}), ("final", 3, True)]
    calls.clear()
    policy(step=MAX_STEPS).save_final(None)  # a rerun that resumed from step 3
    assert calls == [("final", 3, True)]
    calls.clear()
    policy(resume=False, step=MAX_STEPS).save_final(None)
    assert calls == [("checkpoint", 3, None), ("final", 3, True)]


# ----------------------------------------------------------------------------------------------- on a full tmpfs
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk (unmounted afterwards); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {(done.stderr or done.stdout).strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves `leave` bytes free on `disk`."""
    filler = disk / "filler"
    size = free_bytes(disk) - leave
    assert size > 0
    with open(filler, "wb") as f:
        for start in range(0, size, 1 << 20):
            f.write(bytes(min(1 << 20, size - start)))
    return filler


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same tiny SFT run with room to spare: its final weights, and the sizes of its checkpoint (on a tmpfs) and
    model file."""
    from nova_rt.train import main

    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = tiny_config(tmp, train={"max_steps": MAX_STEPS}, checkpoint={"every": 0, "keep_last": 1})
    assert main(["--config", str(cfg)]) == 0
    run = tmp / "run"
    return SimpleNamespace(weights=load_file(run / "final" / "model.safetensors"),
                           checkpoint=_pages(run / "checkpoints" / f"step_{MAX_STEPS:08d}"),
                           model=(run / "final" / "model.safetensors").stat().st_size)


def _error_line(err: str) -> str:
    """The error line of the CLI's stderr (progress bars of the HF save may come first), checked to be one line."""
    lines = [ln for ln in err.splitlines() if ln.startswith("nova_rt:")]
    assert len(lines) == 2 and lines[1] == "nova_rt: (NOVA_RT_DEBUG=1 shows the traceback)", err
    return lines[0]


def _numbers(line: str) -> tuple[int, int]:
    m = re.search(r"needs about ([\d,]+) bytes .*?, ([\d,]+) bytes(?: \([\d.]+ \w+\))? free", line)
    assert m, line
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def test_disk_full_writing_final_keeps_the_last_step_and_the_rerun_only_writes_final(
        tmp_path, capsys, small_disk, uninterrupted):
    run = small_disk / "run"
    cfg = str(tiny_config(tmp_path, run={"dir": str(run)}, train={"max_steps": MAX_STEPS},
                          checkpoint={"every": 0, "keep_last": 1}))
    filler = _fill(small_disk, uninterrupted.checkpoint + 64 * KIB + uninterrupted.model // 2)
    code, err = run_cli(capsys, "--config", cfg)
    assert code == 2, err
    line = _error_line(err)
    assert line.startswith(f"nova_rt: disk full: {run}: No space left on device writing the model final/: "), err
    assert line.endswith("step_00000003 is complete: free space, then rerun to write the model without training "
                         "again"), err
    needed, free = _numbers(line)
    assert 0.9 * uninterrupted.model < needed <= uninterrupted.model and free < needed
    assert "Traceback" not in err
    assert _leftovers(run) == [] and not (run / "final").exists()
    assert (run / "checkpoints" / f"step_{MAX_STEPS:08d}" / MANIFEST).exists()
    metrics = (run / "metrics.jsonl").read_bytes()

    filler.unlink()
    code, err = run_cli(capsys, "--config", cfg)
    assert code == 0, err
    assert (run / "metrics.jsonl").read_bytes() == metrics  # no step trained again (each row holds its step time)
    assert _equal_weights(run / "final", uninterrupted.weights)
    assert _leftovers(run) == []


def test_disk_full_writing_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(
        tmp_path, capsys, small_disk, uninterrupted):
    run = small_disk / "run"
    cfg = str(tiny_config(tmp_path, run={"dir": str(run)}, train={"max_steps": MAX_STEPS},
                          checkpoint={"every": 1, "keep_last": 1}))
    filler = _fill(small_disk, uninterrupted.checkpoint * 3 // 2 + 64 * KIB)  # room for one checkpoint, not two
    code, err = run_cli(capsys, "--config", cfg)
    assert code == 2, err
    line = _error_line(err)
    assert line.startswith(f"nova_rt: disk full: {run / 'checkpoints'}: No space left on device writing the "
                           "checkpoint of step 2: "), err
    assert line.endswith("free space, then rerun to resume from step_00000001 (step 1), which is intact"), err
    needed, free = _numbers(line)
    assert needed > uninterrupted.checkpoint * 0.9 and free < needed
    assert _leftovers(run) == [] and [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert verify_manifest(run / "checkpoints" / "step_00000001", "state.pt") is None

    filler.unlink()
    code, err = run_cli(capsys, "--config", cfg)
    assert code == 0, err
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert _equal_weights(run / "final", uninterrupted.weights)
    assert _leftovers(run) == []
