"""SFT on packed chat data: tokenize with the chat template (loss on assistant tokens), pack best-fit-decreasing,
train with the token- or sequence-mean loss over the global batch, save the model as an HF directory.

With `data.eval_files`, the held-out loss (mean NLL per supervised token over the eval documents) is logged before
training (step 0), every `train.eval_every` steps and after the last step: eval_loss, eval_docs, eval_tokens and
eval_loss_se (standard error of the per-document mean NLL across documents: the noise of the estimate)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from nova_rt.backends import get_backend
from nova_rt.config import Config
from nova_rt.data.chat import IGNORE
from nova_rt.data.packing import BatchSchedule, collate, pack_samples
from nova_rt.data.sft import load_sft_samples
from nova_rt.errors import UserError
from nova_rt.models.causal import batch_logprobs
from nova_rt.stages import register_stage
from nova_rt.stages.common import data_files, eval_hook, run_steps, setup, telemetry_for
from nova_rt.telemetry import flops_per_token

log = logging.getLogger("nova_rt.sft")


def build_sft_rows(cfg: Config, tokenizer, files: list[str] | None = None, max_rows: int = 0):
    """Samples -> packed rows (only the first `max_rows` samples when > 0). Returns (rows, counts, utilization)."""
    d = cfg.data
    if cfg.packing.enabled and d.max_seq_len > cfg.packing.max_tokens:
        raise UserError(f"data.max_seq_len={d.max_seq_len} exceeds packing.max_tokens={cfg.packing.max_tokens}")
    samples, counts = load_sft_samples(data_files(cfg, files or d.train_files), tokenizer,
                                       max_seq_len=d.max_seq_len, overlong=d.overlong, on_error=d.on_error,
                                       system_prompt=d.system_prompt)
    if max_rows > 0:
        samples = samples[:max_rows]
    rows, util = pack_samples(samples, cfg.packing.max_tokens, cfg.packing.enabled)
    return rows, counts, util


def _document_sums(logp_T: torch.Tensor, row) -> list[tuple[float, int]]:
    """(summed NLL, supervised tokens) of every document of a packed row with a supervised token, in order."""
    out = []
    mask_T = torch.from_numpy(row.targets != IGNORE)
    for a, b in zip(row.cu_seqlens[:-1].tolist(), row.cu_seqlens[1:].tolist()):
        n = int(mask_T[a:b].sum())
        if n:
            out.append((-float(logp_T[a:b][mask_T[a:b]].sum()), n))
    return out


@torch.no_grad()
def document_nll(module, rows: list, device, skip_last: int = 0) -> np.ndarray:
    """(docs, 2) float64: summed NLL and supervised-token count of every document of `rows` (packed rows, each
    forwarded alone), in row order; the last `skip_last` rows are forwarded but not counted (ranks of a sharded
    model must run the same number of forwards). Documents without a supervised token are left out."""
    was_training = module.training
    module.eval()
    out = []
    for i, row in enumerate(rows):
        mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate([row]).items()}
        logp_T = batch_logprobs(module, mb)["logprobs"].double().cpu()
        if i < len(rows) - skip_last:
            out += _document_sums(logp_T, row)
    module.train(was_training)
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def nll_summary(docs: np.ndarray) -> dict:
    """eval_loss (NLL per supervised token), eval_loss_se (s.e. of the per-document mean NLL), counts."""
    per_doc = docs[:, 0] / docs[:, 1]
    se = float(per_doc.std(ddof=1) / np.sqrt(len(per_doc))) if len(per_doc) > 1 else float("nan")
    return {"eval_loss": float(docs[:, 0].sum() / docs[:, 1].sum()), "eval_loss_se": se,
            "eval_docs": float(len(docs)), "eval_tokens": float(docs[:, 1].sum())}


def heldout_evaluator(cfg: Config, info, policy, tokenizer):
    """evaluate() -> eval_* metrics over cfg.data.eval_files (rows split over data-parallel ranks, gathered), or
    None. Each row is one forward-only micro-batch on the policy backend."""
    if not cfg.data.eval_files:
        return None
    rows, _, _ = build_sft_rows(cfg, tokenizer, cfg.data.eval_files, max_rows=cfg.data.eval_max_rows)
    if not rows:
        raise UserError(f"data.eval_files {cfg.data.eval_files}: no usable eval sample")
    rank, world = policy.dp_rank, policy.dp_size
    mine = rows[rank::world]
    pad = -(-len(rows) // world) - len(mine)  # 0 or 1 repeated row, so every rank forwards as often
    batches = [collate([row]) for row in mine + rows[:pad]]

    def evaluate() -> dict:
        logps = policy.forward(batches, lambda out, mb: out["logprobs"].double().cpu())
        docs = np.array([d for row, logp_T in zip(mine, logps) for d in _document_sums(logp_T, row)],
                        dtype=np.float64).reshape(-1, 2)
        if world > 1:  # gather every rank's documents: sizes first, then each rank's block summed in place
            sizes = torch.zeros(world, dtype=torch.float64)  # (on the policy's device: NCCL reduces no CPU tensor)
            sizes[rank] = len(docs)
            sizes = policy.dp_sum(sizes.to(policy.device)).long().tolist()
            buf = torch.zeros(sum(sizes), 2, dtype=torch.float64)
            lo = sum(sizes[:rank])
            buf[lo:lo + len(docs)] = torch.from_numpy(docs)
            docs = policy.dp_sum(buf.to(policy.device)).cpu().numpy()
        return nll_summary(docs)

    return evaluate


def build_sft_batches(cfg: Config, tokenizer, world_size: int, files: list[str] | None = None):
    """Samples -> packed rows -> schedule. Returns (rows, schedule, counts, utilization)."""
    rows, counts, util = build_sft_rows(cfg, tokenizer, files)
    sched = BatchSchedule(len(rows), cfg.train.global_batch, cfg.train.micro_batch, world_size, cfg.run.seed,
                          shuffle=cfg.data.shuffle)
    return rows, sched, counts, util


@register_stage("sft")
def run(cfg: Config) -> dict:
    info, run_dir = setup(cfg)
    backend = get_backend(cfg.parallel.backend)
    if cfg.train.loss_reduction not in backend.sft_loss_reductions:
        raise ValueError(f"parallel.backend={backend.name} supports train.loss_reduction="
                         f"{' or '.join(backend.sft_loss_reductions)} only")
    policy, tok = backend.build(cfg, info, run_dir)
    rows, sched, counts, util = build_sft_batches(cfg, tok, policy.dp_size)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    policy.resume()
    telemetry = telemetry_for(cfg, info, run_dir, policy.step)
    size = policy.model_size()  # (parameters, layers, hidden size) for the MFU, or None
    peak = telemetry.gpu.peak_tflops if telemetry.gpu is not None and size is not None else None

    def micro_batches_for(step: int) -> list[dict]:
        return policy.sft_micro_batches(rows, sched, step, cfg.train.loss_reduction)

    def extra_metrics(step: int, m: dict) -> dict:
        global_rows = [rows[i] for i in sched.global_rows(step)]
        tokens = sum(r.num_tokens for r in global_rows)
        slots = cfg.packing.max_tokens * len(global_rows) if cfg.packing.enabled else tokens
        out = {"tokens": tokens, "tokens_per_s": tokens / m["step_time_s"], "pack_utilization": tokens / slots,
               "epoch": step // sched.steps_per_epoch}
        if peak:
            mean_doc = tokens / sum(len(r.cu_seqlens) - 1 for r in global_rows)
            fpt = flops_per_token(size[0], size[1], size[2], mean_doc)
            out["mfu"] = fpt * tokens / m["step_time_s"] / (peak * 1e12 * info.world_size)
        return out

    evaluate = None
    if cfg.data.eval_files and not policy.sft_heldout_eval:
        if info.is_main:
            log.warning("data.eval_files: the held-out loss is not evaluated on the %s backend with this layout "
                        "(context_parallel > 1)", backend.name)
    else:
        evaluate = heldout_evaluator(cfg, info, policy, tok)
    with_eval = eval_hook(cfg, telemetry, evaluate, policy.step)
    run_steps(cfg, policy, telemetry, micro_batches_for, None,
              lambda step, m: {**extra_metrics(step, m), **with_eval(step, m)})
    telemetry.close(plot=cfg.logging.plot, keys=("loss", "eval_loss") if evaluate else ("loss",))
    return {"final": policy.save_final(tok), "data": dict(counts), "pack_utilization": util}
