"""Checkpoints that survive SIGKILL and never run code: written under a temporary name, hashed, fsynced, renamed.

Layout: <run dir>/checkpoints/step_00000010/{model.pt, optimizer.pt, state.pt, rng_rank<r>.pt, manifest.json}.
Every file is written into `step_N.tmp`; rank 0 then writes manifest.json (each file's size and sha256) last and
renames the directory into place, so a `step_*` directory with a manifest is complete. Resuming verifies the newest
one; a checkpoint whose files are missing, truncated, altered or unreadable is moved aside to `step_N.corrupt` and
the previous complete one is used (with a warning). Directories without a manifest load unverified when their
state.pt exists.

Files are read with `torch.load(weights_only=True)`, so a planted pickle is a CheckpointError, never run; RNG states
are stored as tensors and plain types for that reason. Resuming restores the model, optimizer, scheduler, data
position and every RNG state of every rank: a resumed CPU run is bit-identical to an uninterrupted one. Older RNG
files: docs/reliability.md#how-the-guards-work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from nova_rt.disk import disk_writes, resume_hint, state_nbytes
from nova_rt.distributed import DistInfo, barrier, broadcast_object, scoped_group
from nova_rt.errors import CheckpointError

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
# What a damaged file raises from torch.load (zip reader errors are RuntimeError; a cut pickle is EOFError).
LOAD_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError)


# ----------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Every RNG state of this process as tensors and plain types (loadable with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    if isinstance(npst, dict):
        key = npst["key"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", key, npst["pos"], npst["has_gauss"], npst["gauss"]))
    else:  # older checkpoints: np.random.get_state()'s tuple
        np.random.set_state(npst)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- safe loading
def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (older RNG files hold np.random.get_state()'s uint32 array)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: Path, *, mmap: bool = False, numpy_arrays: bool = False):
    """torch.load(weights_only=True). A file holding anything but tensors and plain types is refused with a
    CheckpointError (nothing in it runs); a damaged file raises one of LOAD_ERRORS."""
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, weights_only=True, mmap=mmap)
        return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise
        m = re.search(r"GLOBAL [\w.]+|Unsupported \w+ \S+", str(exc))
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain Python types"
                              f"{f' ({m.group(0)})' if m else ''}; nova_rt loads checkpoints with "
                              "weights_only=True and never runs code from them. Delete it if you did not write it."
                              ) from None


# ----------------------------------------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file in `directory` in manifest.json (written last, fsynced)."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)


def verify_manifest(directory: Path, legacy_marker: str) -> str | None:
    """None if every file of `directory` matches its manifest, else what is wrong. A directory without a manifest
    (older versions) passes when `legacy_marker` exists in it."""
    mpath = directory / MANIFEST
    if not mpath.exists():
        return None if (directory / legacy_marker).exists() else f"no {MANIFEST} (incomplete)"
    try:
        files = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, meta in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def quarantine(path: Path) -> Path:
    """Move a checkpoint that cannot be used out of the way (kept for inspection): step_N -> step_N.corrupt."""
    dest = path.with_name(path.name + ".corrupt")
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    os.replace(path, dest)
    return dest


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with disk_writes(path.parent, path.name, needed=lambda: state_nbytes(obj), cleanup=[tmp]):
        torch.save(obj, tmp)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(self, run_dir: str | Path, info: DistInfo, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.info = info
        self.keep_last = keep_last

    def complete(self) -> list[tuple[int, Path]]:
        """(step, dir) of every checkpoint with a manifest (or, from older versions, a state.pt), oldest first."""
        if not self.root.exists():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and ((p / MANIFEST).exists() or (p / "state.pt").exists()):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def save(self, step: int, model_state: dict | None, optim_state: dict | None, state: dict) -> Path:
        """Rank 0 writes model/optimizer/state; every rank writes its RNG state. Collective when distributed.
        A write that fails for lack of space removes step_N.tmp and is a DiskFullError naming the directory, the bytes
        needed and free, and the checkpoint a rerun resumes from (nova_rt.disk)."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        with disk_writes(self.root, f"the checkpoint of step {step}", cleanup=[tmp] if self.info.is_main else [],
                         needed=lambda: state_nbytes((model_state, optim_state, state)),
                         then=lambda: resume_hint(self.complete())):
            if self.info.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            barrier()
            torch.save(rng_state(), tmp / f"rng_rank{self.info.rank}.pt")
            if self.info.is_main:
                if model_state is not None:
                    torch.save(model_state, tmp / "model.pt")
                if optim_state is not None:
                    torch.save(optim_state, tmp / "optimizer.pt")
                torch.save({**state, "step": step, "world_size": self.info.world_size}, tmp / "state.pt")
            barrier()
            if self.info.is_main:
                write_manifest(tmp)
                _fsync_dir(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune()
        barrier()
        return final
    def load(self, path: Path) -> tuple[dict | None, dict | None, dict]:
        state = safe_load(path / "state.pt")
        if state.get("world_size", 1) != self.info.world_size:
            raise CheckpointError(f"{path} was written by {state['world_size']} ranks; this run has "
                                  f"{self.info.world_size} (resume with the same world size)")
        model = safe_load(path / "model.pt") if (path / "model.pt").exists() else None
        optim = safe_load(path / "optimizer.pt") if (path / "optimizer.pt").exists() else None
        set_rng_state(safe_load(path / f"rng_rank{self.info.rank}.pt", numpy_arrays=True))
        return model, optim, state

    def load_latest(self) -> tuple[Path, dict | None, dict | None, dict] | None:
        """(path, model, optimizer, state) of the newest checkpoint that verifies and loads, or None. One that does
        not is moved aside (step_N.corrupt) with a warning and the previous one is tried. Collective."""
        for _, path in reversed(self.complete()):
            reason = broadcast_object(verify_manifest(path, "state.pt") if self.info.is_main else None)
            loaded = None
            if reason is None:
                try:
                    loaded = self.load(path)
                except CheckpointError:
                    raise  # refused (not plain tensors/types) or another world size: the user decides
                except LOAD_ERRORS as exc:
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                failed = _gather_flags(reason)
                reason = reason or (f"rank {failed[0]} could not load it" if failed else None)
            if reason is None:
                return (path, *loaded)
            if self.info.is_main:
                moved = quarantine(path)
                log.warning("checkpoint %s cannot be used (%s); moved it to %s and falling back to the previous "
                            "complete checkpoint", path, reason, moved.name)
            barrier()
        return None

    def _prune(self) -> None:
        for p in self.root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        if self.keep_last > 0:
            for _, p in self.complete()[:-self.keep_last]:
                shutil.rmtree(p, ignore_errors=True)


def _gather_flags(reason: str | None) -> list[int]:
    """Ranks whose load failed (every rank learns the list)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [0] if reason else []
    out: list = [None] * dist.get_world_size(group=scoped_group())
    dist.all_gather_object(out, reason is not None, group=scoped_group())
    return [r for r, bad in enumerate(out) if bad]
