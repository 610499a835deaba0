"""Checkpoints that survive SIGKILL: written under a temporary name, fsynced, then renamed.

Layout: <run dir>/checkpoints/step_00000010/{model.pt, optimizer.pt, state.pt, rng_rank<r>.pt}. A directory
exists under its final name only once every file in it was written, so the newest `step_*` directory is always
complete; `*.tmp*` leftovers of a killed save are ignored and cleaned up. Resuming restores the model, the
optimizer, the scheduler, the trainer/data position and every RNG state (python, numpy, torch CPU and CUDA) of
every rank, which makes a resumed CPU run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from nova_rt.distributed import DistInfo, barrier

_STEP_RE = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, info: DistInfo, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.info = info
        self.keep_last = keep_last

    def complete(self) -> list[tuple[int, Path]]:
        if not self.root.exists():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / "state.pt").exists():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def save(self, step: int, model_state: dict | None, optim_state: dict | None, state: dict) -> Path:
        """Rank 0 writes model/optimizer/state; every rank writes its RNG state. Collective when distributed."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
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
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def load(self, path: Path) -> tuple[dict | None, dict | None, dict]:
        state = torch.load(path / "state.pt", weights_only=False)
        if state.get("world_size", 1) != self.info.world_size:
            raise RuntimeError(f"{path} was written by {state['world_size']} ranks; this run has "
                               f"{self.info.world_size} (resume with the same world size)")
        model = torch.load(path / "model.pt", weights_only=False) if (path / "model.pt").exists() else None
        optim = torch.load(path / "optimizer.pt", weights_only=False) if (path / "optimizer.pt").exists() else None
        set_rng_state(torch.load(path / f"rng_rank{self.info.rank}.pt", weights_only=False))
        return model, optim, state

    def _prune(self) -> None:
        for p in self.root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        if self.keep_last > 0:
            for _, p in self.complete()[:-self.keep_last]:
                shutil.rmtree(p, ignore_errors=True)
