"""Pieces every trainable stage shares: process setup, model loading, the step loop and the final save."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nova_rt.config import Config, resolve_path
from nova_rt.cpu_runtime import cpu_allocator
from nova_rt.distributed import DistInfo, barrier, init_distributed
from nova_rt.lr_schedule import lr_at
from nova_rt.telemetry import Telemetry

log = logging.getLogger("nova_rt")


def setup(cfg: Config) -> tuple[DistInfo, Path]:
    """Init the process group, seeds, threads and logging; create the run dir and record the resolved config."""
    info = init_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if info.device.type == "cpu":
        cpu_allocator(cfg.train.cpu_allocator)
    seed_everything(cfg.run.seed + info.rank)
    run_dir = Path(cfg.run.dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        tmp.replace(run_dir / "config.json")
    barrier()
    return info, run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_policy(cfg: Config, path: str | None = None):
    """(hf_model, tokenizer) for cfg.model (or `path`), with attention and activation checkpointing applied."""
    from nova_rt.models.checkpointing import apply_group_checkpointing
    from nova_rt.models.loading import load_causal_lm

    m = cfg.model
    model, tok = load_causal_lm(resolve_path(cfg, path or m.path), dtype=m.dtype, attn_impl=m.attn_impl,
                                tiny=m.tiny, tokenizer_path=resolve_path(cfg, m.tokenizer), seed=cfg.run.seed)
    model.config.use_cache = False
    if cfg.train.activation_checkpointing > 0:
        apply_group_checkpointing(model.get_decoder().layers, cfg.train.activation_checkpointing)
    return model, tok


def data_files(cfg: Config, files: list[str]) -> list[str]:
    return [resolve_path(cfg, f) for f in files]


def run_steps(cfg: Config, info: DistInfo, trainer, telemetry: Telemetry,
              micro_batches_for: Callable[[int], list[dict]], loss_fn: Callable,
              extra_metrics: Callable[[int, dict], dict] | None = None, checkpoint_extra: Callable | None = None):
    """The step loop of supervised stages: train, log, checkpoint every N steps."""
    while trainer.step < cfg.train.max_steps:
        step = trainer.step
        t0 = time.perf_counter()
        mbs = micro_batches_for(step)
        metrics = trainer.train_step(mbs, loss_fn)
        if extra_metrics is not None:
            metrics.update(extra_metrics(step, metrics))
        metrics["step_time_s"] = time.perf_counter() - t0
        telemetry.log(trainer.step, metrics)
        if trainer.due(cfg.checkpoint.every) and trainer.step < cfg.train.max_steps:
            trainer.save_checkpoint(checkpoint_extra() if checkpoint_extra else None)


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


def save_final_policy(cfg: Config, info: DistInfo, trainer, hf_model, tokenizer, run_dir: Path) -> str | None:
    """Write the trained model (the trainer module's `lm.` submodule) as an HF directory in run_dir/final.
    Collective: every rank gathers (FSDP2), rank 0 writes; returns the path on rank 0, else None."""
    from nova_rt.trainer import save_hf_atomic

    final = None
    if cfg.checkpoint.save_final:
        state = trainer.model_state()
        if info.is_main:
            final = save_hf_atomic(hf_model, tokenizer, run_dir / "final",
                                   state_dict={k[len("lm."):]: v for k, v in state.items()})
    barrier()
    return str(final) if final else None


# ----------------------------------------------------------------------------------------------- megatron backend
def megatron_backend(cfg: Config, path: str | None = None, *, trainable: bool = True):
    """MegatronBackend for cfg.model (or `path`) with cfg.optim and cfg.parallel; trainable=False: frozen reference."""
    from nova_rt.models.loading import resolve_model_path, to_dtype
    from nova_rt.parallel import MegatronBackend

    o = cfg.optim
    return MegatronBackend(resolve_model_path(resolve_path(cfg, path or cfg.model.path)), cfg.parallel,
                           dtype=to_dtype(cfg.model.dtype), lr=o.lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                           seed=cfg.run.seed, betas=tuple(o.betas), eps=o.eps, trainable=trainable)


def megatron_tokenizer(cfg: Config):
    """The tokenizer of cfg.model.tokenizer, else of the model directory (the megatron stages load no HF model)."""
    from transformers import AutoTokenizer

    from nova_rt.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_path(cfg, cfg.model.tokenizer) or
                                         resolve_model_path(resolve_path(cfg, cfg.model.path)))


def megatron_resume(cfg: Config, backend, run_dir: Path) -> tuple[int, dict | None]:
    """(step, this rank's extra state) of the newest complete megatron checkpoint, loaded into `backend`;
    (0, None) for a fresh run."""
    from nova_rt.parallel import checkpoint as mckpt

    path = mckpt.latest(run_dir / "checkpoints") if cfg.checkpoint.resume else None
    if path is None:
        return 0, None
    step, extra = mckpt.load(backend, path)
    log.info("resumed from %s (step %d)", path, step)
    return step, extra


def megatron_guard(cfg: Config, run_dir: Path, start: int):
    """nova_rt.trainer's NonFiniteGuard over megatron checkpoints; a run resumed at `start` continues the count of
    its checkpoint (meta.json `nonfinite_total`)."""
    import torch.distributed as dist

    from nova_rt.parallel import checkpoint as mckpt
    from nova_rt.trainer import NonFiniteGuard

    root = run_dir / "checkpoints"
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, is_main, lambda: mckpt.last_complete(root))
    if start > 0:
        guard.total = int(mckpt.read_meta(root / f"step_{start:08d}").get("nonfinite_total", 0))
    return guard


def run_megatron_steps(cfg: Config, backend, telemetry: Telemetry, run_dir: Path, start: int,
                       micro_batches_for: Callable[[int], list[dict]], loss_fn: Callable | None = None,
                       extra_metrics: Callable[[int, dict], dict] | None = None) -> None:
    """The step loop of supervised stages on the megatron backend: the trainer's lr schedule, backend.train_step
    (loss_fn None: token-mean SFT loss; else a stage loss over per-token log-probs), metrics, and exact-resume
    checkpoints every checkpoint.every steps (the data position is the step: batches are a function of it).
    The HF trainer's non-finite policy: a step with a NaN/inf loss or grad norm applies no update (the backend
    skips it), is counted (`nonfinite_skipped`) and warned; train.max_nonfinite_steps in a row stop the run with a
    NonFiniteError; no checkpoint is written while the last step was non-finite, and no final model either (the
    NonFiniteError is raised here, before the stage's save)."""
    from nova_rt.parallel import checkpoint as mckpt

    o, every = cfg.optim, cfg.checkpoint.every
    guard = megatron_guard(cfg, run_dir, start)
    for step in range(start, cfg.train.max_steps):
        t0 = time.perf_counter()
        backend.set_lr(lr_at(o, cfg.train.max_steps, step))
        metrics = backend.train_step(micro_batches_for(step), loss_fn)
        guard.count(step + 1, not backend.update_skipped, metrics["loss"], metrics["grad_norm"])
        metrics["nonfinite_skipped"] = guard.total
        metrics["step_time_s"] = time.perf_counter() - t0
        metrics["lr"] = backend.optimizer.param_groups[0]["lr"]
        if extra_metrics is not None:
            metrics.update(extra_metrics(step, metrics))
        telemetry.log(step + 1, metrics)
        if every > 0 and (step + 1) % every == 0 and step + 1 < cfg.train.max_steps:
            if guard.streak == 0:
                mckpt.save(backend, run_dir / "checkpoints", step + 1, keep_last=cfg.checkpoint.keep_last,
                           meta={"nonfinite_total": guard.total})
            elif guard.is_main:
                log.warning("step %d: checkpoint not written (the last step was non-finite)", step + 1)
    if cfg.checkpoint.save_final:
        guard.refuse_model(cfg.train.max_steps)


def save_megatron_final(cfg: Config, info: DistInfo, backend, tokenizer, run_dir: Path) -> str | None:
    """Collective: write the trained weights (and tokenizer) as an HF directory run_dir/final, atomically.
    A non-finite parameter on any rank is a NonFiniteError on every rank, before anything is written."""
    import os
    import shutil

    from nova_rt.errors import NonFiniteError
    from nova_rt.parallel import checkpoint as mckpt

    if not cfg.checkpoint.save_final:
        return None
    if not mckpt.all_finite(backend):
        raise NonFiniteError(f"step {cfg.train.max_steps}: a model parameter is non-finite; neither a checkpoint nor "
                             f"a model is written from it (last checkpoint: "
                             f"{mckpt.last_complete(run_dir / 'checkpoints') or 'none'}). Lower optim.lr.")
    final = run_dir / "final"
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    backend.save_hf(tmp)
    if info.is_main:
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return str(final) if info.is_main else None
