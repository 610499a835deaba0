"""The reward-model stage with `parallel.backend: megatron`: the HF stage's data path (chosen and rejected packed in
the same rows, batch schedule, pair weights) and objective (rm.rm_objective over nova_rt.losses.preference.RewardLoss),
with the scores computed by MegatronBackend(head="score") on the last pipeline stage and passed to the loss there.

The scalar head (megatron_model.ScoreHead: the final-norm hidden state of each sequence's last token, times a (1, D)
weight replicated over TP ranks) starts from exactly the head the HF stage draws for the same run.seed: both come
from nova_rt.models.reward.sequence_classifier_from_causal, here run on a stand-in decoder, which also gives the
`*ForSequenceClassification` config the final save writes. The final model is therefore an HF directory with the
same layout as the HF stage's (`model.*`, `score.weight`, num_labels=1) that AutoModelForSequenceClassification
loads. Micro-batches are dealt over data-parallel ranks; checkpoints and exact resume: nova_rt.parallel.checkpoint.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import torch
import torch.distributed as dist

from nova_rt.config import Config
from nova_rt.data.packing import BatchSchedule
from nova_rt.data.preference import eval_micro_batches, step_micro_batches
from nova_rt.losses.preference import RewardLoss
from nova_rt.models.reward import check_last_tokens, sequence_classifier_from_causal
from nova_rt.parallel.packed import from_shifted
from nova_rt.stages.common import megatron_resume, megatron_tokenizer, run_megatron_steps, save_megatron_final
from nova_rt.stages.rm import build_pair_data, eval_hook, rm_objective
from nova_rt.telemetry import Telemetry

log = logging.getLogger("nova_rt.rm")
_FORWARD_CHUNK = 8  # eval micro-batches per forward-only schedule (padded to one length, kept on device)
_EVAL_KEYS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy")


def hf_score_head(model_dir: str, pad_token_id: int | None, seed: int, dtype: torch.dtype):
    """(sequence-classification config, (1, D) initial score weight) as the HF stage builds them: its constructor run
    on a stand-in decoder (one empty parameter of `dtype`), so the config edits and the seeded draw exist once."""
    from transformers import AutoConfig

    decoder = torch.nn.Module()
    decoder.register_parameter("stand_in", torch.nn.Parameter(torch.empty(0, dtype=dtype)))
    shell = types.SimpleNamespace(config=AutoConfig.from_pretrained(model_dir), get_decoder=lambda: decoder)
    seq_cls = sequence_classifier_from_causal(shell, pad_token_id, seed=seed)
    return seq_cls.config, seq_cls.score.weight.detach().clone()


def evaluate(backend, batches: list[dict], loss: RewardLoss) -> dict:
    """eval_* means over the eval pairs (the HF stage's evaluate_pairs keys), all-reduced over DP ranks."""
    from megatron.core import parallel_state as ps

    def stats(out, mb):
        value, st = rm_objective(out["scores"], mb, loss)
        return [float(value)] + [st[k] for k in _EVAL_KEYS[1:]]

    rows = [r for i in range(0, len(batches), _FORWARD_CHUNK)
            for r in backend.forward(batches[i:i + _FORWARD_CHUNK], stats)]
    t = torch.tensor([sum(r[j] for r in rows) for j in range(len(_EVAL_KEYS))], dtype=torch.float64,
                     device=backend.device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return {f"eval_{k}": v for k, v in zip(_EVAL_KEYS, t.tolist())}


def _score_backend(cfg: Config, tok):
    """common.megatron_backend's MegatronBackend with head="score", its initial head and the config save_hf writes."""
    from nova_rt.config import resolve_path
    from nova_rt.models.loading import resolve_model_path, to_dtype
    from nova_rt.parallel import MegatronBackend

    model_dir, dtype, o = resolve_model_path(resolve_path(cfg, cfg.model.path)), to_dtype(cfg.model.dtype), cfg.optim
    config, score_init = hf_score_head(model_dir, tok.pad_token_id, cfg.run.seed, dtype)
    backend = MegatronBackend(model_dir, cfg.parallel, dtype=dtype, lr=o.lr, weight_decay=o.weight_decay,
                              grad_clip=o.grad_clip, seed=cfg.run.seed, betas=tuple(o.betas), eps=o.eps, head="score",
                              score_init=score_init)
    backend.save_config = config
    return backend


def run_megatron_rm(cfg: Config, info, run_dir: Path) -> dict:
    tok = megatron_tokenizer(cfg)
    pairs, rows, counts, util = build_pair_data(cfg, tok, cfg.data.train_files)
    check_last_tokens([s.input_ids[-1] for p in pairs for s in (p.chosen, p.rejected)], tok.pad_token_id)
    backend = _score_backend(cfg, tok)
    dp_rank, dp_size = backend.dp_rank, backend.dp_size
    sched = BatchSchedule(len(rows), cfg.train.global_batch, cfg.train.micro_batch, dp_size, cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    start, _ = megatron_resume(cfg, backend, run_dir)
    tel = Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                    progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps, start_step=start)
    loss = RewardLoss(cfg.rm.alpha)
    evaluate_fn = None
    if cfg.data.eval_files:
        eval_pairs, eval_rows = build_pair_data(cfg, tok, cfg.data.eval_files, cfg.data.eval_max_rows)[:2]
        eval_batches = [from_shifted(mb) for mb in eval_micro_batches(eval_rows, eval_pairs, cfg.train.micro_batch,
                                                                      dp_rank, dp_size)]
        evaluate_fn = lambda: evaluate(backend, eval_batches, loss)  # noqa: E731

    def micro_batches_for(step: int) -> list[dict]:
        return [from_shifted(mb) for mb in step_micro_batches(rows, pairs, sched.global_rows(step),
                                                              cfg.train.micro_batch, dp_rank, dp_size)]

    run_megatron_steps(cfg, backend, tel, run_dir, start, micro_batches_for,
                       lambda out, mb: rm_objective(out["scores"], mb, loss), eval_hook(cfg, tel, evaluate_fn, start))
    tel.close(plot=cfg.logging.plot, keys=("loss", "accuracy", "eval_accuracy"))
    final = save_megatron_final(cfg, info, backend, tok, run_dir)
    return {"final": final, "data": dict(counts), "pack_utilization": util}
