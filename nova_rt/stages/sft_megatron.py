"""SFT with `parallel.backend: megatron`: the same data path (chat rendering, BFD packing, batch schedule) feeding
nova_rt.parallel.MegatronBackend (TP/PP/SP/VPP on megatron-core), with the trainer's lr schedule.

Differences from the HF backend, by design of megatron-core: the loss reduction is the global token mean only
(`calculate_per_token_loss`) and precision follows `model.dtype` (bf16 needs CUDA). Checkpoints every
`checkpoint.every` steps hold each rank's shards, optimizer and RNG states (nova_rt.parallel.checkpoint), and a
rerun resumes from the newest complete one exactly; the final model is an HF directory in run.dir/final.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from nova_rt.config import Config
from nova_rt.data.packing import BatchSchedule, PackedRow
from nova_rt.stages.common import megatron_backend, megatron_resume, run_megatron_steps, save_megatron_final
from nova_rt.telemetry import Telemetry

log = logging.getLogger("nova_rt.sft")


def to_megatron_batch(row: PackedRow) -> dict:
    """nova_rt rows carry shifted targets (targets[t] = token t+1); megatron's labels are aligned with input_ids."""
    labels = np.full(row.num_tokens, -100, dtype=np.int64)
    labels[1:] = row.targets[:-1]
    return {"input_ids": torch.from_numpy(row.input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(row.position_ids), "cu_seqlens": torch.from_numpy(row.cu_seqlens)}


def run_megatron_sft(cfg: Config, info, run_dir: Path, rows: list[PackedRow], tokenizer) -> dict:
    if cfg.train.loss_reduction != "token":
        raise ValueError("parallel.backend=megatron supports train.loss_reduction=token only")
    backend = megatron_backend(cfg)
    start, _ = megatron_resume(cfg, backend, run_dir)
    sched = BatchSchedule(len(rows), cfg.train.global_batch, cfg.train.micro_batch, backend.dp_size, cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    tel = Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                    progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps, start_step=start)

    def micro_batches_for(step: int) -> list[dict]:
        return [to_megatron_batch(rows[i]) for mb in sched.rank_micro_batches(step, backend.dp_rank) for i in mb]

    def extra_metrics(step: int, m: dict) -> dict:
        tokens = sum(rows[i].num_tokens for i in sched.global_rows(step))
        return {"tokens": tokens, "tokens_per_s": tokens / m["step_time_s"]}

    run_megatron_steps(cfg, backend, tel, run_dir, start, micro_batches_for, extra_metrics=extra_metrics)
    tel.close(plot=cfg.logging.plot)
    return {"final": save_megatron_final(cfg, info, backend, tokenizer, run_dir)}
