"""DPO with `parallel.backend: megatron`: the HF stage's data path (packed pairs, batch schedule, reference cache) and
loss (dpo.pair_objective over nova_rt.losses.preference.DPOLoss), with the policy's per-token log-probs computed by
MegatronBackend (vocab-parallel cross entropy on the last pipeline stage) and passed to the loss there.

Reference log-probs come from the backend in forward-only mode: with dpo.reference_logprobs=precompute from the
policy itself before training (it still holds its initial weights) or, with dpo.reference set, from a frozen second
backend, cached on disk exactly like the HF stage; with online, the frozen backend runs on each step's micro-batches
before the policy's step. Micro-batches are dealt over data-parallel ranks (every TP/PP rank of a replica gets the
same ones). Checkpoints and resume: nova_rt.parallel.checkpoint (the data position is the step).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from nova_rt.config import Config
from nova_rt.data.packing import BatchSchedule
from nova_rt.data.preference import PairRow, PreferencePair, collate_pairs, eval_micro_batches, step_micro_batches
from nova_rt.losses.preference import DPOLoss, sequence_sums
from nova_rt.parallel.packed import from_shifted
from nova_rt.stages.common import (
    megatron_backend,
    megatron_resume,
    megatron_tokenizer,
    run_megatron_steps,
    save_megatron_final,
)
from nova_rt.stages.dpo import cached_reference_logps, dpo_loss_from_logprobs, with_reference
from nova_rt.stages.rm import build_pair_data, eval_hook
from nova_rt.telemetry import Telemetry

log = logging.getLogger("nova_rt.dpo")
_FORWARD_CHUNK = 8  # micro-batches per forward-only schedule (all of them are padded to one length and kept on device)


def _pair_sums(out: dict, mb: dict) -> torch.Tensor:
    return sequence_sums(out["logprobs"], mb["cu_seqlens"]).double().cpu()


def reference_table(backend, mbs: list[dict], n_pairs: int) -> torch.Tensor:
    """(n_pairs, 2) fp32 sequence log-prob sums [chosen, rejected] of this DP rank's micro-batches `mbs` (rows
    outside them stay 0); callers sum the tables over DP ranks."""
    out = torch.zeros(n_pairs, 2, dtype=torch.float64)
    for i in range(0, len(mbs), _FORWARD_CHUNK):
        chunk = mbs[i:i + _FORWARD_CHUNK]
        for mb, seq_S in zip(chunk, backend.forward(chunk, _pair_sums)):
            out[mb["pair_ids"], 0], out[mb["pair_ids"], 1] = seq_S[0::2], seq_S[1::2]
    return out.float()


def all_reference_logps(backend, rows: list[PairRow], pairs: list[PreferencePair], micro_batch: int) -> torch.Tensor:
    """Collective: the (N_pairs, 2) reference table on every rank; rows dealt round-robin over DP ranks."""
    from megatron.core import parallel_state as ps

    mine = rows[backend.dp_rank::backend.dp_size]
    mbs = [from_shifted(collate_pairs(mine[i:i + micro_batch], pairs, 1.0)) for i in range(0, len(mine), micro_batch)]
    table = reference_table(backend, mbs, len(pairs)).to(backend.device)
    dist.all_reduce(table, group=ps.get_data_parallel_group())
    return table.cpu()


def evaluate(backend, batches: list[dict], loss: DPOLoss) -> dict:
    """eval_* means over the eval pairs (the HF stage's evaluate_pairs keys), all-reduced over DP ranks."""
    from megatron.core import parallel_state as ps

    keys = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy"]

    def stats(out, mb):
        value, st = dpo_loss_from_logprobs(out, mb, loss)
        return [float(value)] + [st[k] for k in keys[1:]]

    rows = [r for i in range(0, len(batches), _FORWARD_CHUNK)
            for r in backend.forward(batches[i:i + _FORWARD_CHUNK], stats)]
    t = torch.tensor([sum(r[j] for r in rows) for j in range(len(keys))], dtype=torch.float64, device=backend.device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return {f"eval_{k}": v for k, v in zip(keys, t.tolist())}


def _references(cfg: Config, info, run_dir: Path, backend, train, eval_data):
    """(frozen reference backend or None, train table or None, eval table or None), before any resume."""
    d, mb = cfg.dpo, cfg.train.micro_batch
    ref = megatron_backend(cfg, d.reference, trainable=False) if d.reference else backend
    if d.reference_logprobs == "online":
        if ref is backend:  # a frozen copy of the initial weights
            ref = megatron_backend(cfg, trainable=False)
        return ref, None, None
    tables = [cached_reference_logps(cfg, info, run_dir, split, lambda p=p, r=r: all_reference_logps(ref, r, p, mb), p)
              if p is not None else None for split, (p, r) in (("train", train), ("eval", eval_data))]
    return None, *tables


def run_megatron_dpo(cfg: Config, info, run_dir: Path) -> dict:
    tok = megatron_tokenizer(cfg)
    pairs, rows, counts, util = build_pair_data(cfg, tok, cfg.data.train_files)
    eval_data = build_pair_data(cfg, tok, cfg.data.eval_files, cfg.data.eval_max_rows)[:2] if cfg.data.eval_files else (None, None)
    backend = megatron_backend(cfg)
    dp_rank, dp_size = backend.dp_rank, backend.dp_size
    sched = BatchSchedule(len(rows), cfg.train.global_batch, cfg.train.micro_batch, dp_size, cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    ref, ref_train, ref_eval = _references(cfg, info, run_dir, backend, (pairs, rows), eval_data)
    start, _ = megatron_resume(cfg, backend, run_dir)
    tel = Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                    progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps, start_step=start)
    d = cfg.dpo
    loss = DPOLoss(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing)

    def with_ref(mbs: list[dict], table) -> list[dict]:
        mbs = [from_shifted(mb) for mb in mbs]
        if ref is None:
            return with_reference(mbs, table)
        for mb, seq_S in zip(mbs, ref.forward(mbs, _pair_sums)):  # online: the frozen reference, same batches
            mb["ref_logps"] = torch.stack([seq_S[0::2], seq_S[1::2]], dim=1).float()
        return mbs

    evaluate_fn = None
    if eval_data[0] is not None:
        eval_batches = with_ref(eval_micro_batches(eval_data[1], eval_data[0], cfg.train.micro_batch, dp_rank,
                                                   dp_size), ref_eval)
        evaluate_fn = lambda: evaluate(backend, eval_batches, loss)  # noqa: E731

    def micro_batches_for(step: int) -> list[dict]:
        return with_ref(step_micro_batches(rows, pairs, sched.global_rows(step), cfg.train.micro_batch, dp_rank,
                                           dp_size), ref_train)

    run_megatron_steps(cfg, backend, tel, run_dir, start, micro_batches_for,
                       lambda out, mb: dpo_loss_from_logprobs(out, mb, loss), eval_hook(cfg, tel, evaluate_fn, start))
    tel.close(plot=cfg.logging.plot, keys=("loss", "margin", "eval_margin"))
    final = save_megatron_final(cfg, info, backend, tok, run_dir)
    return {"final": final, "data": dict(counts), "pack_utilization": util}
