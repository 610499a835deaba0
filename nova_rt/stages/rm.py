"""Reward-model training (`run.stage: rm`): Bradley–Terry + pointwise MSE on packed preference pairs.

The model is the policy's decoder plus a scalar head (nova_rt.models.reward); chosen and rejected of each pair sit
in the same packed row, so one forward gives both scores. The loss is the mean over the pairs of the global batch
(each micro-batch sums its pairs' losses times 1 / global pairs; see nova_rt.trainer). Eval on data.eval_files
runs before training (logged at step 0), every train.eval_every steps and after the last step, writing
eval_loss / eval_accuracy / eval_margin / eval_reward_* to metrics.jsonl. The final model is an HF
`*ForSequenceClassification` directory (num_labels=1) in run.dir/final. With parallel.backend=megatron the same data
and objective run on megatron-core (nova_rt.stages.rm_megatron).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nova_rt.config import Config, register_section
from nova_rt.data.packing import BatchSchedule
from nova_rt.data.preference import eval_micro_batches, load_preference_pairs, pack_pairs, step_micro_batches
from nova_rt.distributed import all_reduce_sum
from nova_rt.errors import UserError
from nova_rt.losses.preference import RewardLoss, pair_stats
from nova_rt.models.reward import RewardModel, batch_scores, check_last_tokens
from nova_rt.stages import register_stage
from nova_rt.stages.common import data_files, eval_hook, load_policy, run_steps, save_final_policy, setup
from nova_rt.telemetry import Telemetry
from nova_rt.trainer import Trainer

log = logging.getLogger("nova_rt.rm")


@register_section("rm")
@dataclass(kw_only=True)
class RMConfig:
    alpha: float = 0.1
    """Weight of the pointwise term α[(r_w - s_w)² + (r_l - s_l)²], applied only to pairs with chosen_score and
    rejected_score (normalised absolute scores); other pairs train on Bradley–Terry alone. The report gives no value."""

    def validate(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"rm.alpha must be >= 0, got {self.alpha}")


def build_pair_data(cfg: Config, tokenizer, files: list[str], max_rows: int = 0):
    """(pairs, packed rows, counts, utilization) for data files, with the config's data and packing settings; only
    the first `max_rows` pairs when > 0."""
    d, pk = cfg.data, cfg.packing
    if pk.enabled and 2 * d.max_seq_len > pk.max_tokens:
        raise UserError(f"packing.max_tokens={pk.max_tokens} must hold a whole pair: at least "
                        f"2 * data.max_seq_len = {2 * d.max_seq_len}")
    pairs, counts = load_preference_pairs(data_files(cfg, files), tokenizer, max_seq_len=d.max_seq_len,
                                          overlong=d.overlong, on_error=d.on_error, system_prompt=d.system_prompt)
    if max_rows > 0:
        pairs = pairs[:max_rows]
    rows, util = pack_pairs(pairs, pk.max_tokens, pk.enabled)
    return pairs, rows, counts, util


def rm_loss(model, mb: dict, loss: RewardLoss):
    """Global-batch-weighted RM loss of one micro-batch and its stats."""
    return rm_objective(batch_scores(model, mb), mb, loss)


def rm_objective(scores_S: torch.Tensor, mb: dict, loss: RewardLoss):
    """(global-batch-weighted loss, stats) from the (S,) scores of a micro-batch (chosen, rejected interleaved);
    shared by both backends (the megatron one computes the scores on its last pipeline stage)."""
    r_chosen_P, r_rejected_P = scores_S[0::2], scores_S[1::2]
    losses_P = loss(r_chosen_P, r_rejected_P, mb["scores"], mb["has_score"])
    w = mb["pair_weight"]
    stats = pair_stats(r_chosen_P, r_rejected_P, w)
    stats["pairs"] = float(len(r_chosen_P))
    stats["tokens"] = float(mb["input_ids"].numel())
    return losses_P.sum() * w, stats


@torch.no_grad()
def evaluate_pairs(model, batches: list[dict], loss_fn: Callable, device, distributed: bool) -> dict:
    """Sum of loss and stats over this rank's eval micro-batches, all-reduced; keys prefixed with eval_."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for mb in batches:
        mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        loss, stats = loss_fn(model, mb)
        for k, v in {"loss": float(loss), **stats}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    keys = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "pairs"]
    t = torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)
    if distributed:
        all_reduce_sum(t)
    model.train(was_training)
    return {f"eval_{k}": v for k, v in zip(keys, t.tolist())}


@register_stage("rm")
def run(cfg: Config) -> dict:
    info, run_dir = setup(cfg)
    if cfg.parallel.backend == "megatron":
        from nova_rt.stages.rm_megatron import run_megatron_rm

        return run_megatron_rm(cfg, info, run_dir)
    hf_model, tok = load_policy(cfg)
    module = RewardModel.from_causal_lm(hf_model, tok.pad_token_id, seed=cfg.run.seed)
    del hf_model
    pairs, rows, counts, util = build_pair_data(cfg, tok, cfg.data.train_files)
    check_last_tokens([s.input_ids[-1] for p in pairs for s in (p.chosen, p.rejected)], tok.pad_token_id)
    sched = BatchSchedule(len(rows), cfg.train.global_batch, cfg.train.micro_batch, info.world_size, cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    trainer = Trainer(cfg, info, module, run_dir=run_dir)
    trainer.maybe_resume()
    telemetry = Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                          progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps,
                          start_step=trainer.step, local_rank=info.local_rank)
    loss = RewardLoss(cfg.rm.alpha)
    loss_fn = lambda model, mb: rm_loss(model, mb, loss)  # noqa: E731
    evaluate = None
    if cfg.data.eval_files:
        eval_pairs, eval_rows, _, _ = build_pair_data(cfg, tok, cfg.data.eval_files, cfg.data.eval_max_rows)
        eval_batches = eval_micro_batches(eval_rows, eval_pairs, cfg.train.micro_batch, info.rank, info.world_size)
        evaluate = lambda: evaluate_pairs(trainer.model, eval_batches, loss_fn, info.device,  # noqa: E731
                                          info.distributed)

    def micro_batches_for(step: int) -> list[dict]:
        return step_micro_batches(rows, pairs, sched.global_rows(step), cfg.train.micro_batch, info.rank,
                                  info.world_size)

    run_steps(cfg, info, trainer, telemetry, micro_batches_for, loss_fn,
              eval_hook(cfg, telemetry, evaluate, trainer.step))
    telemetry.close(plot=cfg.logging.plot, keys=("loss", "accuracy", "eval_accuracy"))
    final = save_final_policy(cfg, info, trainer, module.lm, tok, run_dir)
    return {"final": final, "data": dict(counts), "pack_utilization": util}
