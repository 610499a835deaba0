"""Exact-resume checkpoints for MegatronTrainer: per-rank shards, optimizer and RNG states, step and data position.

Layout: <run dir>/checkpoints/step_00000010/{rank_00000.pt, rank_00001.pt, ..., meta.json, manifest.json, DONE}.
Every rank writes its own `MegatronTrainer.state_dict()` (with the distributed optimizer, gathered into DP rank 0's
file of each model-parallel group, megatron's dp-zero format) into `step_N.tmp`; after a barrier global rank 0 writes
meta.json and manifest.json (size and sha256 of every file), fsyncs, writes DONE and renames the directory into
place. Only a directory with DONE under its final name is complete, so a killed run resumes from the newest complete
one; one that fails its manifest is moved aside to `step_N.corrupt` with a warning. Rank files are read with
weights_only=True (a planted pickle is refused). The same layout restores every rank's own file; any other goes
through nova_rt.parallel.reshard. The run dir must be on a filesystem every rank sees.

The final model is still written as an HF directory (MegatronTrainer.save_hf); these directories are for resuming.
Sequence of a save and a resume: docs/parallelism.md#checkpoints-step-by-step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from nova_rt.checkpoint import quarantine, safe_load, verify_manifest, write_manifest
from nova_rt.disk import disk_writes, resume_hint, state_nbytes
from nova_rt.errors import CheckpointError, NonFiniteError
from nova_rt.parallel import reshard

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{8})$")


def _layout(backend) -> dict:
    p = backend.pcfg
    return {"world_size": dist.get_world_size(), "tensor_parallel": p.tensor_parallel,
            "pipeline_parallel": p.pipeline_parallel, "virtual_pipeline_parallel": p.virtual_pipeline_parallel or 0,
            "distributed_optimizer": bool(p.distributed_optimizer)}


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root`, oldest first."""
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_RE.match(p.name)) and (p / "DONE").exists()]
    return sorted(found)


def verified_latest(root: Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; ones that do not are moved aside."""
    for _, path in reversed(complete(root)):
        reason = verify_manifest(path, "DONE")
        if reason is None:
            return path
        moved = quarantine(path)
        log.warning("checkpoint %s cannot be used (%s); moved it to %s and falling back to the previous complete "
                    "checkpoint", path, reason, moved.name)
    return None


def latest(root: Path) -> Path | None:
    """Collective: the newest complete, verified checkpoint as global rank 0 sees it (every rank gets the same)."""
    found = verified_latest(root) if dist.get_rank() == 0 else None
    box = [str(found) if found else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (not verified), or None."""
    found = complete(root)
    return found[-1][1] if found else None


def read_meta(path: Path) -> dict:
    """meta.json of checkpoint `path` (step, layout and the `meta` given to `save`); {} when it has none."""
    try:
        return json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return {}


def all_finite(backend) -> bool:
    """Collective: every rank's parameter shards are finite."""
    params = [p for c in backend.model for p in c.parameters()]
    bad = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    with torch.no_grad():
        for p in params:
            bad += (~torch.isfinite(p)).sum()
    dist.all_reduce(bad)
    return bad.item() == 0


def save(backend, root: Path, step: int, extra: dict | None = None, keep_last: int = 2,
         meta: dict | None = None) -> Path:
    """Collective: write checkpoint `step` under `root` (see the module docstring); returns its directory.
    `meta`: run-level values, the same on every rank (e.g. the non-finite step count), kept in meta.json.
    A non-finite parameter on any rank is a NonFiniteError on every rank, before anything is written: such a
    checkpoint must never push a good one out. A write that fails for lack of space is a DiskFullError on the rank
    that met it, naming the directory, the bytes needed (that rank's file) and free, and the checkpoint a rerun
    resumes from; rank 0 removes step_N.tmp (nova_rt.disk)."""
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    rank = dist.get_rank()
    if not all_finite(backend):
        raise NonFiniteError(f"step {step}: a model parameter is non-finite; checkpoint not written (last "
                             f"checkpoint: {last_complete(root) or 'none'}). Lower optim.lr.")
    state: dict = {}
    with disk_writes(root, f"the checkpoint of step {step}", needed=lambda: state_nbytes(state),
                     cleanup=[tmp] if rank == 0 else [], then=lambda: resume_hint(complete(root))):
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        path = tmp / f"rank_{rank:05d}.pt"
        state = {**backend.state_dict(), "reshard": reshard.describe(backend), "extra": extra, "step": step}
        torch.save(state, path)
        _fsync(path)
        dist.barrier()
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({**(meta or {}), "step": step, **_layout(backend)}, indent=1))
            _fsync(tmp / "meta.json")
            write_manifest(tmp)
            (tmp / "DONE").write_text("")
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(root)
            _prune(root, keep_last)
    dist.barrier()
    return final


def load(backend, path: Path) -> tuple[int, dict | None]:
    """Restore this rank's part of checkpoint `path` into `backend`; returns (step, this rank's extra state)."""
    meta = json.loads((path / "meta.json").read_text())
    want = _layout(backend)
    got = {k: meta.get(k, False if k == "distributed_optimizer" else None) for k in want}  # older meta: no key
    try:
        if got != want:
            return reshard.load_resharded(backend, path, meta)
        state = safe_load(path / f"rank_{dist.get_rank():05d}.pt", numpy_arrays=True)
        backend.load_state_dict(state)
    except RuntimeError as exc:
        if "state_dict" not in str(exc) and "size mismatch" not in str(exc):
            raise
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
        raise CheckpointError(f"{path}: written by a model of another shape or architecture ({detail}). Resume with "
                              "the same model, or start fresh with another run.dir or checkpoint.resume=false"
                              ) from None
    return int(state["step"]), state["extra"]


def _prune(root: Path, keep_last: int) -> None:
    for p in root.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for _, p in complete(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
