"""Reward-model training (`run.stage: rm`): Bradley–Terry + pointwise MSE on packed preference pairs.

The model is the policy's decoder plus a scalar head (nova_rt.models.reward); chosen and rejected of each pair sit
in the same packed row, so one forward gives both scores. The loss is the mean over the pairs of the global batch
(each micro-batch sums its pairs' losses times 1 / global pairs; see nova_rt.trainer). Eval on data.eval_files
runs before training (logged at step 0), every train.eval_every steps and after the last step, writing
eval_loss / eval_accuracy / eval_margin / eval_reward_* to metrics.jsonl. The final model is an HF
`*ForSequenceClassification` directory (num_labels=1) in run.dir/final. The stage runs on any policy backend
(parallel.backend, nova_rt.backends) with head="score": on megatron the scores come from the last pipeline stage and
the head starts from exactly the HF stage's draw for the same run.seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nova_rt.backends import get_backend
from nova_rt.config import Config, register_section
from nova_rt.data.packing import BatchSchedule
from nova_rt.data.preference import eval_micro_batches, load_preference_pairs, pack_pairs, step_micro_batches
from nova_rt.errors import UserError
from nova_rt.losses.preference import RewardLoss, pair_stats
from nova_rt.models.reward import check_last_tokens
from nova_rt.stages import register_stage
from nova_rt.stages.common import data_files, eval_hook, run_steps, setup, telemetry_for

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


def evaluate_pairs(policy, batches: list[dict], objective: Callable) -> dict:
    """Sum of the objective's loss and pair stats over this rank's eval micro-batches (forward only), summed over
    data-parallel ranks; keys prefixed with eval_ (the batches' pair weights 1 / all pairs make the sums means)."""
    keys = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "pairs"]

    def stats(out: dict, mb: dict) -> list[float]:
        value, st = objective(out, mb)
        return [float(value)] + [float(st[k]) for k in keys[1:]]

    rows = policy.forward(batches, stats)
    t = torch.tensor([sum(r[j] for r in rows) for j in range(len(keys))], dtype=torch.float64, device=policy.device)
    policy.dp_sum(t)
    return {f"eval_{k}": v for k, v in zip(keys, t.tolist())}


@register_stage("rm")
def run(cfg: Config) -> dict:
    info, run_dir = setup(cfg)
    policy, tok = get_backend(cfg.parallel.backend).build(cfg, info, run_dir, head="score")
    pairs, rows, counts, util = build_pair_data(cfg, tok, cfg.data.train_files)
    check_last_tokens([s.input_ids[-1] for p in pairs for s in (p.chosen, p.rejected)], tok.pad_token_id)
    dp_rank, dp_size, micro = policy.dp_rank, policy.dp_size, cfg.train.micro_batch
    sched = BatchSchedule(len(rows), cfg.train.global_batch, micro, dp_size, cfg.run.seed, shuffle=cfg.data.shuffle)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    policy.resume()
    telemetry = telemetry_for(cfg, info, run_dir, policy.step)
    loss = RewardLoss(cfg.rm.alpha)
    objective = lambda out, mb: rm_objective(out["scores"], mb, loss)  # noqa: E731
    evaluate = None
    if cfg.data.eval_files:
        eval_pairs, eval_rows, _, _ = build_pair_data(cfg, tok, cfg.data.eval_files, cfg.data.eval_max_rows)
        eval_batches = eval_micro_batches(eval_rows, eval_pairs, micro, dp_rank, dp_size)
        evaluate = lambda: evaluate_pairs(policy, eval_batches, objective)  # noqa: E731

    def micro_batches_for(step: int) -> list[dict]:
        return step_micro_batches(rows, pairs, sched.global_rows(step), micro, dp_rank, dp_size)

    run_steps(cfg, policy, telemetry, micro_batches_for, objective, eval_hook(cfg, telemetry, evaluate, policy.step))
    telemetry.close(plot=cfg.logging.plot, keys=("loss", "accuracy", "eval_accuracy"))
    final = policy.save_final(tok)
    return {"final": final, "data": dict(counts), "pack_utilization": util}
