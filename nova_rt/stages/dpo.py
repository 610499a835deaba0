"""Direct preference optimisation (`run.stage: dpo`): sigmoid DPO (cDPO with label smoothing) or IPO on packed pairs.

Sequence log-probs come from the fused log-prob op (no logits materialised), summed per packed sequence; chosen and
rejected of a pair share a packed row. The reference model (dpo.reference, default: the policy's initial weights) is
either run once before training over the train and eval pairs, its per-pair log-probs cached on disk in run.dir
keyed by a hash of the data and the reference ("precompute": no second model in memory while training, and a
resumed run reuses the cache), or kept frozen in memory and run on every micro-batch ("online"). Step-level DPO
(SuperCorrect) is the same loss over rows whose prompt ends with a partial assistant solution (nova_rt.data.preference).

Loss: mean over the pairs of the global batch. Stats: implicit rewards β(log π - log π_ref) of chosen/rejected,
margin, accuracy; eval_* on data.eval_files at step 0, every train.eval_every steps and at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from nova_rt.checkpoint import LOAD_ERRORS
from nova_rt.config import Config, register_section, resolve_path
from nova_rt.data.packing import BatchSchedule
from nova_rt.data.preference import (
    PairRow,
    PreferencePair,
    collate_pairs,
    eval_micro_batches,
    pairs_digest,
    step_micro_batches,
)
from nova_rt.distributed import DistInfo, all_reduce_sum, barrier
from nova_rt.losses.preference import DPOLoss, pair_stats, sequence_sums
from nova_rt.models.causal import CausalLMLogprobs, batch_logprobs
from nova_rt.stages import register_stage
from nova_rt.stages.common import load_policy, run_steps, save_final_policy, setup
from nova_rt.stages.rm import build_pair_data, eval_hook, evaluate_pairs
from nova_rt.telemetry import Telemetry
from nova_rt.trainer import Trainer

log = logging.getLogger("nova_rt.dpo")


@register_section("dpo")
@dataclass(kw_only=True)
class DPOConfig:
    beta: float = 0.1
    """Inverse temperature of the implicit reward β·log(π/π_ref) (IPO: the target gap is 1/(2β))."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO; cDPO when label_smoothing > 0) or ipo."""
    label_smoothing: float = 0.0
    """cDPO: probability ε that a preference label is flipped, in [0, 0.5); sigmoid loss only."""
    reference: str = ""
    """Reference model: a local HF dir or builtin:/tiny: name; empty = the policy's initial weights (model.path)."""
    reference_logprobs: Literal["precompute", "online"] = "precompute"
    """precompute: one pass before training, cached in run.dir keyed by data hash; online: a frozen copy in memory."""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("dpo.label_smoothing applies to loss_type 'sigmoid' only")


def pair_logps(model, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_P, rejected_P) sequence log-prob sums over completion tokens of a packed micro-batch."""
    seq_S = sequence_sums(batch_logprobs(model, mb)["logprobs"], mb["cu_seqlens"])
    return seq_S[0::2], seq_S[1::2]


def dpo_loss(model, mb: dict, loss: DPOLoss, ref_model=None):
    """Global-batch-weighted DPO loss of one micro-batch. Reference log-probs come from mb["ref_logps"] (P, 2)
    when precomputed, else from `ref_model` run on the same packed batch without gradients."""
    pol_c, pol_r = pair_logps(model, mb)
    if "ref_logps" in mb:
        ref_c, ref_r = mb["ref_logps"][:, 0], mb["ref_logps"][:, 1]
    else:
        with torch.no_grad():
            ref_c, ref_r = pair_logps(ref_model, mb)
    return pair_objective(pol_c, pol_r, ref_c, ref_r, mb, loss)


def dpo_loss_from_logprobs(out: dict, mb: dict, loss: DPOLoss):
    """dpo_loss over per-token log-probs computed elsewhere (the megatron backend's last pipeline stage):
    out["logprobs"] (T,) aligned with mb["targets"]; reference log-probs from mb["ref_logps"] (P, 2)."""
    seq_S = sequence_sums(out["logprobs"], mb["cu_seqlens"])
    ref = mb["ref_logps"].to(seq_S.device)
    return pair_objective(seq_S[0::2], seq_S[1::2], ref[:, 0], ref[:, 1], mb, loss)


def pair_objective(pol_c, pol_r, ref_c, ref_r, mb: dict, loss: DPOLoss):
    """(global-batch-weighted loss, stats) from policy and reference sequence log-prob sums (P,) of chosen/rejected."""
    losses_P, rew_c, rew_r = loss(pol_c, pol_r, ref_c, ref_r)
    w = mb["pair_weight"]
    stats = pair_stats(rew_c, rew_r, w)
    stats["logps_chosen"] = float(pol_c.detach().sum()) * w
    stats["logps_rejected"] = float(pol_r.detach().sum()) * w
    stats["pairs"] = float(len(pol_c))
    stats["tokens"] = float(mb["input_ids"].numel())
    return losses_P.sum() * w, stats


@torch.no_grad()
def compute_reference_logps(ref_model, rows: list[PairRow], pairs: list[PreferencePair], info: DistInfo,
                            micro_batch: int = 1) -> torch.Tensor:
    """(N_pairs, 2) fp32 reference log-prob sums [chosen, rejected]; rows are shared round-robin over ranks and the
    results all-reduced, so every rank ends with the full table."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=info.device)
    was_training = ref_model.training
    ref_model.eval()
    mine = rows[info.rank::info.world_size]
    for i in range(0, len(mine), micro_batch):
        mb = collate_pairs(mine[i:i + micro_batch], pairs, 1.0)
        mb = {k: v.to(info.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        c, r = pair_logps(ref_model, mb)
        out[mb["pair_ids"], 0] = c.double()
        out[mb["pair_ids"], 1] = r.double()
    ref_model.train(was_training)
    if info.distributed:
        all_reduce_sum(out)
    return out.float().cpu()


def reference_identity(cfg: Config) -> str:
    """What determines the reference weights: its path (plus tiny config and seed), and file sizes/mtimes."""
    path = cfg.dpo.reference or cfg.model.path
    ident = {"path": path, "dtype": cfg.model.dtype}
    if path.startswith("tiny:"):
        ident.update(tiny=cfg.model.tiny, seed=cfg.run.seed)
    local = Path(resolve_path(cfg, path))
    if local.is_dir():
        ident["files"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in local.iterdir()
                                if f.suffix in (".safetensors", ".bin", ".json"))
    return json.dumps(ident, sort_keys=True, default=str)


def cached_reference_logps(cfg: Config, info: DistInfo, run_dir: Path, split: str, compute: Callable[[], torch.Tensor],
                           pairs: list[PreferencePair]) -> torch.Tensor:
    """Load run_dir/ref_logps_<split>_<key>.pt if its key matches, else run `compute()` (every rank; returns the
    (N_pairs, 2) table) and write the result atomically."""
    key = hashlib.sha256((pairs_digest(pairs) + reference_identity(cfg)).encode()).hexdigest()
    path = run_dir / f"ref_logps_{split}_{key[:16]}.pt"
    if path.exists():
        try:
            cached = torch.load(path, weights_only=True)
        except LOAD_ERRORS as exc:  # damaged, or not plain tensors (refused, never run): recompute and overwrite
            log.warning("reference log-prob cache %s unreadable (%s: %s); recomputing", path, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key and tuple(cached["logps"].shape) == (len(pairs), 2):
            if info.is_main:
                log.info("reference log-probs (%s) from cache %s", split, path)
            return cached["logps"]
    logps = compute()
    if info.is_main:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"key": key, "logps": logps}, tmp)
        os.replace(tmp, path)
        log.info("reference log-probs (%s): %d pairs, cached in %s", split, len(pairs), path)
    barrier()
    return logps


def with_reference(batches: list[dict], table: torch.Tensor | None) -> list[dict]:
    """Attach precomputed reference log-probs (P, 2) to micro-batches (no-op for online references)."""
    if table is not None:
        for mb in batches:
            mb["ref_logps"] = table[mb["pair_ids"]]
    return batches


def build_reference(cfg: Config, info: DistInfo, hf_model):
    """The frozen reference as a CausalLMLogprobs on the device: the policy itself for precompute with the default
    reference (it still holds its initial weights), a deep copy for online, or a separately loaded model."""
    if cfg.dpo.reference:
        ref_hf, _ = load_policy(cfg, path=cfg.dpo.reference)
    elif cfg.dpo.reference_logprobs == "precompute":
        ref_hf = hf_model
    else:
        ref_hf = copy.deepcopy(hf_model)
    ref = CausalLMLogprobs(ref_hf).to(info.device)
    if ref_hf is not hf_model:
        ref.requires_grad_(False)
        ref.eval()
    return ref


@register_stage("dpo")
def run(cfg: Config) -> dict:
    info, run_dir = setup(cfg)
    if cfg.parallel.backend == "megatron":
        from nova_rt.stages.dpo_megatron import run_megatron_dpo

        return run_megatron_dpo(cfg, info, run_dir)
    hf_model, tok = load_policy(cfg)
    pairs, rows, counts, util = build_pair_data(cfg, tok, cfg.data.train_files)
    eval_data = build_pair_data(cfg, tok, cfg.data.eval_files, cfg.data.eval_max_rows) if cfg.data.eval_files else None
    sched = BatchSchedule(len(rows), cfg.train.global_batch, cfg.train.micro_batch, info.world_size, cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    ref = build_reference(cfg, info, hf_model)
    ref_train = ref_eval = None
    if cfg.dpo.reference_logprobs == "precompute":  # before resume: the policy still holds its initial weights
        mb = cfg.train.micro_batch
        ref_train = cached_reference_logps(cfg, info, run_dir, "train",
                                           lambda: compute_reference_logps(ref, rows, pairs, info, mb), pairs)
        if eval_data is not None:
            ref_eval = cached_reference_logps(
                cfg, info, run_dir, "eval", lambda: compute_reference_logps(ref, eval_data[1], eval_data[0], info, mb),
                eval_data[0])
        ref = None
    trainer = Trainer(cfg, info, CausalLMLogprobs(hf_model), run_dir=run_dir)
    trainer.maybe_resume()
    telemetry = Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                          progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps,
                          start_step=trainer.step, local_rank=info.local_rank)
    d = cfg.dpo
    loss = DPOLoss(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing)
    loss_fn = lambda model, mb: dpo_loss(model, mb, loss, ref)  # noqa: E731
    evaluate = None
    if eval_data is not None:
        eval_batches = with_reference(eval_micro_batches(eval_data[1], eval_data[0], cfg.train.micro_batch,
                                                         info.rank, info.world_size), ref_eval)
        evaluate = lambda: evaluate_pairs(trainer.model, eval_batches, loss_fn, info.device,  # noqa: E731
                                          info.distributed)

    def micro_batches_for(step: int) -> list[dict]:
        return with_reference(step_micro_batches(rows, pairs, sched.global_rows(step), cfg.train.micro_batch,
                                                 info.rank, info.world_size), ref_train)

    run_steps(cfg, info, trainer, telemetry, micro_batches_for, loss_fn,
              eval_hook(cfg, telemetry, evaluate, trainer.step))
    telemetry.close(plot=cfg.logging.plot, keys=("loss", "margin", "eval_margin"))
    final = save_final_policy(cfg, info, trainer, hf_model, tok, run_dir)
    return {"final": final, "data": dict(counts), "pack_utilization": util}
