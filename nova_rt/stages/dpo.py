"""Direct preference optimisation (`run.stage: dpo`): sigmoid DPO (cDPO with label smoothing), IPO, or the
reference-free SimPO and ORPO (no reference model built, loaded or precomputed) on packed pairs.

Sequence log-probs come from the fused log-prob op (no logits materialised), summed per packed sequence; chosen and
rejected of a pair share a packed row. The reference model (dpo.reference, default: the policy's initial weights) is
either run once before training with its per-pair log-probs cached in run.dir ("precompute": no second model in
memory, reused on resume) or kept frozen and run on every micro-batch ("online"). Runs on any policy backend
(parallel.backend); on megatron see docs/stages.md#dpo.

Micro-batches are PairBatch (packed pairs, pair ids and weight, the reference's sequence log-probs when known).
Loss: mean over the pairs of the global batch. Stats: rewards (nova_rt.losses.preference.DPOLoss) of chosen/rejected,
margin, accuracy; eval_* on data.eval_files at step 0, every train.eval_every steps and at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from nova_rt.backends import get_backend
from nova_rt.checkpoint import LOAD_ERRORS
from nova_rt.config import Config, register_section, resolve_path
from nova_rt.config_values import check_range
from nova_rt.data.chat import IGNORE
from nova_rt.data.micro_batch import PackedBatch
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
from nova_rt.losses.preference import REFERENCE_FREE, DPOLoss, pair_stats, sequence_sums
from nova_rt.models.causal import batch_logprobs
from nova_rt.stages import register_stage
from nova_rt.stages.common import eval_hook, run_steps, setup, telemetry_for
from nova_rt.stages.rm import build_pair_data, evaluate_pairs

log = logging.getLogger("nova_rt.dpo")


@register_section("dpo")
@dataclass(kw_only=True)
class DPOConfig:
    beta: float = 0.1
    """Inverse temperature of the implicit reward β·log(π/π_ref) (IPO: the target gap is 1/(2β); SimPO: the scale
    of the mean log-prob reward; ORPO: λ, the weight of the odds-ratio term)."""
    loss_type: Literal["sigmoid", "ipo", "simpo", "orpo"] = "sigmoid"
    """sigmoid (DPO; cDPO when label_smoothing > 0), ipo, simpo (reference-free, length-normalised, margin
    simpo_gamma) or orpo (odds ratio + chosen NLL, reference-free); formulas in docs/stages.md#dpo."""
    label_smoothing: float = 0.0
    """cDPO: probability ε that a preference label is flipped, in [0, 0.5); sigmoid and simpo losses only."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ >= 0 (the paper's γ/β is 0.5 for its Mistral/Llama-3 runs); simpo only."""
    nll_weight: float = 0.0
    """simpo only: weight of the chosen response's token-mean NLL added to each pair's loss (TRL's cpo_alpha; 0 is
    the SimPO paper's loss). orpo always adds it with weight 1."""
    reference: str = ""
    """Reference model: a local HF dir or builtin:/tiny: name; empty = the policy's initial weights (model.path).
    Not used by simpo / orpo."""
    reference_logprobs: Literal["precompute", "online"] = "precompute"
    """precompute: one pass before training, cached in run.dir keyed by data hash; online: a frozen copy in memory.
    simpo / orpo compute none."""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check_range("dpo.simpo_gamma", self.simpo_gamma, ge=0.0)
        check_range("dpo.nll_weight", self.nll_weight, ge=0.0)
        t = f"dpo.loss_type={self.loss_type}"
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(f"dpo.label_smoothing applies to loss_type 'sigmoid' or 'simpo' only, not {t}")
        if self.simpo_gamma != DPOConfig.simpo_gamma and self.loss_type != "simpo":
            raise ValueError(f"dpo.simpo_gamma applies to dpo.loss_type=simpo only, not {t}")
        if self.nll_weight and self.loss_type != "simpo":
            raise ValueError(f"dpo.nll_weight applies to dpo.loss_type=simpo only, not {t} (orpo's NLL weight is 1)")
        if self.loss_type in REFERENCE_FREE and self.reference:
            raise ValueError(f"dpo.reference is set but {t} uses no reference model; remove dpo.reference")
        if self.loss_type in REFERENCE_FREE and self.reference_logprobs == "online":
            raise ValueError(f"dpo.reference_logprobs=online but {t} uses no reference model; remove "
                             "dpo.reference_logprobs")


@dataclass(frozen=True, kw_only=True)
class PairBatch(PackedBatch):
    """A DPO micro-batch: packed preference pairs, chosen and rejected interleaved (c0, r0, c1, r1, ...)."""

    pair_ids: torch.Tensor
    """(P,) int64 index of each pair in the data set (the reference table's rows)."""
    pair_weight: float
    """1 / (pairs in the global batch): the loss and the stats are sums with this weight."""
    ref_logprobs: torch.Tensor | None = None
    """(P, 2) fp32 the reference's sequence log-prob sums [chosen, rejected]; None: an online reference model, or
    none (simpo, orpo)."""


def pair_batch(collated: dict) -> PairBatch:
    """A PairBatch of nova_rt.data.preference.collate_pairs's dict (its tokens, pair ids and weight)."""
    return PairBatch.from_collated(collated, pair_ids=collated["pair_ids"], pair_weight=collated["pair_weight"])


def pair_logps(model, mb: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_P, rejected_P) sequence log-prob sums over completion tokens of a packed micro-batch."""
    seq_S = sequence_sums(batch_logprobs(model, mb.model_inputs())["logprobs"], mb.cu_seqlens)
    return seq_S[0::2], seq_S[1::2]


def dpo_loss(model, mb: PairBatch, loss: DPOLoss, ref_model=None):
    """Global-batch-weighted DPO loss of one micro-batch. Reference log-probs come from mb.ref_logprobs (P, 2)
    when precomputed, else from `ref_model` run on the same packed batch without gradients (none: simpo, orpo)."""
    policy_chosen, policy_rejected = pair_logps(model, mb)
    ref_chosen = ref_rejected = None
    if mb.ref_logprobs is not None:
        ref_chosen, ref_rejected = mb.ref_logprobs[:, 0], mb.ref_logprobs[:, 1]
    elif loss.loss_type not in REFERENCE_FREE:
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logps(ref_model, mb)
    return pair_objective(policy_chosen, policy_rejected, ref_chosen, ref_rejected, mb, loss)


def dpo_loss_from_logprobs(outputs: dict, mb: PairBatch, loss: DPOLoss):
    """dpo_loss over per-token log-probs computed elsewhere (the megatron backend's last pipeline stage):
    outputs["logprobs"] (T,) aligned with mb.targets; reference log-probs from mb.ref_logprobs (P, 2) if any."""
    seq_S = sequence_sums(outputs["logprobs"], mb.cu_seqlens)
    if mb.ref_logprobs is None:
        return pair_objective(seq_S[0::2], seq_S[1::2], None, None, mb, loss)
    ref = mb.ref_logprobs.to(seq_S.device)
    return pair_objective(seq_S[0::2], seq_S[1::2], ref[:, 0], ref[:, 1], mb, loss)


def response_tokens(mb: PairBatch) -> torch.Tensor:
    """(S,) the number of response (target) tokens of each packed sequence: |y| of SimPO / ORPO's mean log-prob."""
    return sequence_sums((mb.targets != IGNORE).float(), mb.cu_seqlens)


def pair_objective(policy_chosen, policy_rejected, ref_chosen, ref_rejected, mb: PairBatch, loss: DPOLoss):
    """(global-batch-weighted loss, stats) from policy and reference sequence log-prob sums (P,) of chosen/rejected
    (reference None for simpo / orpo, which divide by the response token counts instead)."""
    counts = ()
    if loss.loss_type in REFERENCE_FREE:
        tokens_S = response_tokens(mb).to(policy_chosen.device)
        counts = (tokens_S[0::2], tokens_S[1::2])
    losses_P, reward_chosen, reward_rejected = loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *counts)
    weight = mb.pair_weight
    stats = pair_stats(reward_chosen, reward_rejected, weight)
    if counts:  # the chosen response's token-mean NLL (ORPO's L_SFT)
        stats["nll"] = -float((policy_chosen.detach() / counts[0]).sum()) * weight
    stats["logps_chosen"] = float(policy_chosen.detach().sum()) * weight
    stats["logps_rejected"] = float(policy_rejected.detach().sum()) * weight
    stats["pairs"] = float(len(policy_chosen))
    stats["tokens"] = float(mb.input_ids.numel())
    return losses_P.sum() * weight, stats


@torch.no_grad()
def compute_reference_logps(ref_model, rows: list[PairRow], pairs: list[PreferencePair], info: DistInfo,
                            micro_batch: int = 1) -> torch.Tensor:
    """(N_pairs, 2) fp32 reference log-prob sums [chosen, rejected]; rows are shared round-robin over ranks and the
    results all-reduced, so every rank ends with the full table."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=info.device)
    was_training = ref_model.training
    ref_model.eval()
    mine = rows[info.rank::info.world_size]
    for start in range(0, len(mine), micro_batch):
        mb = pair_batch(collate_pairs(mine[start:start + micro_batch], pairs, 1.0)).to(info.device)
        chosen, rejected = pair_logps(ref_model, mb)
        out[mb.pair_ids, 0] = chosen.double()
        out[mb.pair_ids, 1] = rejected.double()
    ref_model.train(was_training)
    if info.distributed:
        all_reduce_sum(out)
    return out.float().cpu()


def reference_identity(cfg: Config) -> str:
    """What determines the reference weights: its path (plus tiny config and seed), and file sizes/mtimes."""
    path = cfg.dpo.reference or cfg.model.path
    ident = {"path": path, "dtype": cfg.model.dtype}
    if cfg.model.dtype not in ("float32", "fp32"):  # the default reference is the policy: its fp32 master weights
        ident["master_weights"] = cfg.model.master_weights
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


def with_reference(batches: list[PairBatch], table: torch.Tensor | None) -> list[PairBatch]:
    """The micro-batches with precomputed reference log-probs (P, 2) (as they are for online references)."""
    if table is None:
        return batches
    return [replace(mb, ref_logprobs=table[mb.pair_ids]) for mb in batches]


def _pair_sums(outputs: dict, mb: PairBatch) -> torch.Tensor:
    return sequence_sums(outputs["logprobs"], mb.cu_seqlens).double().cpu()


def with_online_reference(ref, batches: list[PairBatch]) -> list[PairBatch]:
    """The micro-batches with the frozen reference's log-probs (P, 2) of them (dpo.reference_logprobs=online)."""
    return [replace(mb, ref_logprobs=torch.stack([seq_S[0::2], seq_S[1::2]], dim=1).float())
            for mb, seq_S in zip(batches, ref.forward(batches, _pair_sums))]


def reference_table(ref, rows: list[PairRow], pairs: list[PreferencePair], micro_batch: int) -> torch.Tensor:
    """Collective: the (N_pairs, 2) fp32 reference log-prob sums [chosen, rejected] on every rank; rows are dealt
    round-robin over data-parallel ranks and the tables summed. Every rank runs as many forwards (a short rank
    repeats its first micro-batch and drops the result): a sharded model's forward is a collective."""
    mine = rows[ref.dp_rank::ref.dp_size]
    mbs = [pair_batch(collate_pairs(mine[start:start + micro_batch], pairs, 1.0))
           for start in range(0, len(mine), micro_batch)]
    per_rank = -(-len(rows) // ref.dp_size)  # the most rows a rank gets
    n_real, most = len(mbs), -(-per_rank // micro_batch)
    if n_real < most:
        mbs += [mbs[0] if mbs else pair_batch(collate_pairs(rows[:1], pairs, 1.0))] * (most - n_real)
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for mb, seq_S in list(zip(mbs, ref.forward(mbs, _pair_sums)))[:n_real]:
        out[mb.pair_ids, 0], out[mb.pair_ids, 1] = seq_S[0::2], seq_S[1::2]
    return ref.dp_sum(out.to(ref.device)).float().cpu()


def references(cfg: Config, info: DistInfo, run_dir: Path, policy, train: tuple, eval_data: tuple | None):
    """(frozen online reference or None, train table or None, eval table or None), before any resume: the policy
    still holds its initial weights, so the default precomputed reference is the policy itself."""
    d, micro = cfg.dpo, cfg.train.micro_batch
    if d.loss_type in REFERENCE_FREE:
        return None, None, None
    if d.reference_logprobs == "online":
        return policy.reference(d.reference or None, online=True), None, None
    ref = policy.reference(d.reference) if d.reference else policy
    tables = [cached_reference_logps(cfg, info, run_dir, split, lambda p=p, r=r: reference_table(ref, r, p, micro), p)
              if p is not None else None for split, (p, r) in (("train", train), ("eval", eval_data or (None, None)))]
    return None, *tables


@register_stage("dpo")
def run(cfg: Config) -> dict:
    info, run_dir = setup(cfg)
    policy, tok = get_backend(cfg.parallel.backend).build(cfg, info, run_dir)
    pairs, rows, counts, util = build_pair_data(cfg, tok, cfg.data.train_files)
    eval_data = build_pair_data(cfg, tok, cfg.data.eval_files, cfg.data.eval_max_rows)[:2] if cfg.data.eval_files \
        else None
    dp_rank, dp_size, micro = policy.dp_rank, policy.dp_size, cfg.train.micro_batch
    sched = BatchSchedule(len(rows), cfg.train.global_batch, micro, dp_size, cfg.run.seed, shuffle=cfg.data.shuffle)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    ref, ref_train, ref_eval = references(cfg, info, run_dir, policy, (pairs, rows), eval_data)
    policy.resume()
    telemetry = telemetry_for(cfg, info, run_dir, policy.step)
    d = cfg.dpo
    loss = DPOLoss(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                   simpo_gamma=d.simpo_gamma, nll_weight=d.nll_weight)
    objective = lambda outputs, mb: dpo_loss_from_logprobs(outputs, mb, loss)  # noqa: E731

    def with_ref(collated: list[dict], table) -> list[PairBatch]:
        mbs = [pair_batch(mb) for mb in collated]
        return with_reference(mbs, table) if ref is None else with_online_reference(ref, mbs)

    evaluate = None
    if eval_data is not None:
        eval_batches = with_ref(eval_micro_batches(eval_data[1], eval_data[0], micro, dp_rank, dp_size), ref_eval)
        evaluate = lambda: evaluate_pairs(policy, eval_batches, objective)  # noqa: E731

    def micro_batches_for(step: int) -> list[PairBatch]:
        return with_ref(step_micro_batches(rows, pairs, sched.global_rows(step), micro, dp_rank, dp_size), ref_train)

    run_steps(cfg, policy, telemetry, micro_batches_for, objective, eval_hook(cfg, telemetry, evaluate, policy.step))
    telemetry.close(plot=cfg.logging.plot, keys=("loss", "margin", "eval_margin"))
    final = policy.save_final(tok)
    return {"final": final, "data": dict(counts), "pack_utilization": util}
