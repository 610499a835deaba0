"""Pieces every trainable stage shares: process setup, data paths, the step-0 / periodic eval hook. The step loop
(run_steps) and the policy backends are in nova_rt.backends; load_policy and save_final_policy (the HF backend's
model loading and final save) are re-exported from there."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nova_rt import provenance, run_lock
from nova_rt.backends.base import run_steps
from nova_rt.backends.hf import load_policy, save_final_policy
from nova_rt.config import Config, resolve_path
from nova_rt.cpu_runtime import cpu_allocator
from nova_rt.distributed import DistInfo, barrier, init_distributed
from nova_rt.telemetry import Telemetry

__all__ = ["data_files", "eval_hook", "load_policy", "run_steps", "save_final_policy", "seed_everything", "setup",
           "telemetry_for"]

log = logging.getLogger("nova_rt")


def setup(cfg: Config) -> tuple[DistInfo, Path]:
    """Init the process group, seeds, threads and logging; create the run dir, hold it for this run (nova_rt.run_lock:
    another run there is a RunDirInUse error, exit 2, on every rank) and record the resolved config in config.json,
    unless the dir holds checkpoints: then the resume writes it once the checkpoint is accepted (nova_rt.provenance),
    so a refused run leaves the previous run's config.json."""
    info = init_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if info.device.type == "cpu":
        cpu_allocator(cfg.train.cpu_allocator)
    seed_everything(cfg.run.seed + info.rank)
    run_dir = Path(cfg.run.dir)
    run_lock.hold(run_dir, info.is_main)
    if info.is_main and not provenance.has_checkpoints(run_dir):
        provenance.write_config(cfg, run_dir)
    barrier()
    return info, run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def telemetry_for(cfg: Config, info: DistInfo, run_dir: Path, start_step: int, total_steps: int = 0) -> Telemetry:
    """metrics.jsonl (+ TensorBoard, progress bar, plot) of this run, written by the main rank."""
    return Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                     progress_bar=cfg.logging.progress_bar, total_steps=total_steps or cfg.train.max_steps,
                     start_step=start_step, local_rank=info.local_rank)


def data_files(cfg: Config, files: list[str]) -> list[str]:
    return [resolve_path(cfg, f) for f in files]


def eval_hook(cfg: Config, telemetry: Telemetry, evaluate: Callable[[], dict] | None, start_step: int):
    """Log the pre-training eval at step 0 (fresh runs) and return extra_metrics(step, m) for run_steps that adds
    throughput and, every train.eval_every steps and at the last step, the eval metrics."""
    if evaluate is not None and start_step == 0:
        telemetry.log(0, evaluate())

    def extra_metrics(step: int, m: dict) -> dict:
        out = {"tokens_per_s": m["tokens"] / m["step_time_s"]}
        done = step + 1
        if evaluate is not None and ((cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0)
                                     or done == cfg.train.max_steps):
            t0 = time.perf_counter()
            out.update(evaluate())
            out["eval_time_s"] = time.perf_counter() - t0
        return out

    return extra_metrics
