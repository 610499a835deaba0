"""SFT with `parallel.backend: megatron`: the same data path (chat rendering, BFD packing, batch schedule) feeding
nova_rt.parallel.MegatronBackend (TP/PP/SP/VPP on megatron-core), with the trainer's lr schedule.

Differences from the HF backend, by design of megatron-core: the loss reduction is the global token mean only
(`calculate_per_token_loss`), precision follows `model.dtype` (bf16 needs CUDA), and checkpoints are HF
directories written with `save_hf` every `checkpoint.every` steps under `<run.dir>/checkpoints/step_N/hf`; a rerun
restarts from the newest of them with a fresh optimizer state (optimizer/RNG state is not saved on this backend).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from nova_rt.config import Config, resolve_path
from nova_rt.data.packing import BatchSchedule, PackedRow
from nova_rt.distributed import barrier
from nova_rt.models.loading import resolve_model_path, to_dtype
from nova_rt.telemetry import Telemetry
from nova_rt.trainer import lr_lambda

log = logging.getLogger("nova_rt.sft")


def to_megatron_batch(row: PackedRow) -> dict:
    """nova_rt rows carry shifted targets (targets[t] = token t+1); megatron's labels are aligned with input_ids."""
    labels = np.full(row.num_tokens, -100, dtype=np.int64)
    labels[1:] = row.targets[:-1]
    return {"input_ids": torch.from_numpy(row.input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(row.position_ids), "cu_seqlens": torch.from_numpy(row.cu_seqlens)}


def _latest_hf(run_dir: Path) -> tuple[int, Path | None]:
    ck = run_dir / "checkpoints"
    found = sorted((int(p.name.split("_")[1]), p / "hf") for p in ck.glob("step_*") if (p / "hf" / "DONE").exists()) \
        if ck.exists() else []
    return found[-1] if found else (0, None)


def run_megatron_sft(cfg: Config, info, run_dir: Path, rows: list[PackedRow], tokenizer) -> dict:
    from nova_rt.parallel import MegatronBackend

    if cfg.train.loss_reduction != "token":
        raise ValueError("parallel.backend=megatron supports train.loss_reduction=token only")
    model_dir = resolve_model_path(resolve_path(cfg, cfg.model.path))
    start, ckpt = _latest_hf(run_dir) if cfg.checkpoint.resume else (0, None)
    o = cfg.optim
    backend = MegatronBackend(str(ckpt or model_dir), cfg.parallel, dtype=to_dtype(cfg.model.dtype), lr=o.lr,
                              weight_decay=o.weight_decay, grad_clip=o.grad_clip, seed=cfg.run.seed,
                              betas=tuple(o.betas), eps=o.eps)
    sched = BatchSchedule(len(rows), cfg.train.global_batch, cfg.train.micro_batch, backend.dp_size, cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    tel = Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                    progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps, start_step=start)
    for step in range(start, cfg.train.max_steps):
        t0 = time.perf_counter()
        backend.set_lr(o.lr * lr_lambda(step, warmup=o.warmup_steps, total=cfg.train.max_steps, kind=o.scheduler,
                                        min_ratio=o.min_lr_ratio))
        mbs = sched.rank_micro_batches(step, backend.dp_rank)
        batches = [to_megatron_batch(rows[i]) for mb in mbs for i in mb]
        stats = backend.train_step(batches)
        dt = time.perf_counter() - t0
        tokens = sum(rows[i].num_tokens for i in sched.global_rows(step))
        tel.log(step + 1, {**stats, "tokens": tokens, "tokens_per_s": tokens / dt, "step_time_s": dt,
                           "lr": backend.optimizer.param_groups[0]["lr"]})
        every = cfg.checkpoint.every
        if every > 0 and (step + 1) % every == 0 and step + 1 < cfg.train.max_steps:
            _save(backend, run_dir / "checkpoints" / f"step_{step + 1:08d}" / "hf", info)
    tel.close(plot=cfg.logging.plot)
    final = run_dir / "final"
    if cfg.checkpoint.save_final:
        _save(backend, final, info)
        if info.is_main:
            tokenizer.save_pretrained(final)
    return {"final": str(final)}


def _save(backend, out: Path, info) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    if info.is_main:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    backend.save_hf(tmp)
    if info.is_main:
        (tmp / "DONE").write_text(json.dumps({"time": time.time()}))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
    barrier()
