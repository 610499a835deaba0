"""SFT on packed chat data: tokenize with the chat template (loss on assistant tokens), pack best-fit-decreasing,
train with the token- or sequence-mean loss over the global batch, save the model as an HF directory.

With `data.eval_files`, the held-out loss (mean NLL per supervised token over the eval documents) is logged before
training (step 0), every `train.eval_every` steps and after the last step: eval_loss, eval_docs, eval_tokens and
eval_loss_se (standard error of the per-document mean NLL across documents: the noise of the estimate)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from nova_rt.config import Config
from nova_rt.data.chat import IGNORE
from nova_rt.data.packing import BatchSchedule, collate, loss_weights, pack_samples
from nova_rt.data.sft import load_sft_samples
from nova_rt.distributed import all_reduce_sum
from nova_rt.errors import UserError
from nova_rt.models.causal import CausalLMLogprobs, batch_logprobs
from nova_rt.stages import register_stage
from nova_rt.stages.common import data_files, eval_hook, load_policy, run_steps, save_final_policy, setup
from nova_rt.telemetry import Telemetry, flops_per_token
from nova_rt.trainer import Trainer

log = logging.getLogger("nova_rt.sft")


def sft_loss(model, mb: dict):
    """-sum(w * logp) with global-batch weights; stats: supervised tokens and real tokens."""
    out = batch_logprobs(model, mb)
    loss = -(out["logprobs"] * mb["weights"]).sum()
    return loss, {"tokens": float(mb["input_ids"].numel()), "supervised_tokens": float((mb["targets"] >= 0).sum())}


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
        if i >= len(rows) - skip_last:
            continue
        mask_T = torch.from_numpy(row.targets != IGNORE)
        for a, b in zip(row.cu_seqlens[:-1].tolist(), row.cu_seqlens[1:].tolist()):
            n = int(mask_T[a:b].sum())
            if n:
                out.append((-float(logp_T[a:b][mask_T[a:b]].sum()), n))
    module.train(was_training)
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def nll_summary(docs: np.ndarray) -> dict:
    """eval_loss (NLL per supervised token), eval_loss_se (s.e. of the per-document mean NLL), counts."""
    per_doc = docs[:, 0] / docs[:, 1]
    se = float(per_doc.std(ddof=1) / np.sqrt(len(per_doc))) if len(per_doc) > 1 else float("nan")
    return {"eval_loss": float(docs[:, 0].sum() / docs[:, 1].sum()), "eval_loss_se": se,
            "eval_docs": float(len(docs)), "eval_tokens": float(docs[:, 1].sum())}


def heldout_evaluator(cfg: Config, info, module, tokenizer):
    """evaluate() -> eval_* metrics over cfg.data.eval_files (rows split over ranks, gathered), or None."""
    if not cfg.data.eval_files:
        return None
    rows, _, _ = build_sft_rows(cfg, tokenizer, cfg.data.eval_files, max_rows=cfg.data.eval_max_rows)
    if not rows:
        raise UserError(f"data.eval_files {cfg.data.eval_files}: no usable eval sample")
    mine = rows[info.rank::info.world_size]
    pad = -(-len(rows) // info.world_size) - len(mine)  # 0 or 1 repeated row, so every rank forwards as often

    def evaluate() -> dict:
        docs = document_nll(module, mine + rows[:pad], info.device, skip_last=pad)
        if info.distributed:  # gather every rank's documents: sizes first, then each rank's block summed in place
            sizes = torch.zeros(info.world_size, dtype=torch.float64)
            sizes[info.rank] = len(docs)
            sizes = all_reduce_sum(sizes).long().tolist()
            buf = torch.zeros(sum(sizes), 2, dtype=torch.float64)
            lo = sum(sizes[:info.rank])
            buf[lo:lo + len(docs)] = torch.from_numpy(docs)
            docs = all_reduce_sum(buf).numpy()
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
    if cfg.parallel.backend == "megatron":
        return _run_megatron(cfg, info, run_dir)
    if cfg.parallel.backend != "hf":
        raise ValueError(f"parallel.backend must be hf or megatron, got {cfg.parallel.backend!r}")
    hf_model, tok = load_policy(cfg)
    rows, sched, counts, util = build_sft_batches(cfg, tok, info.world_size)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
    module = CausalLMLogprobs(hf_model)
    trainer = Trainer(cfg, info, module, run_dir=run_dir)
    trainer.maybe_resume()
    telemetry = Telemetry(run_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                          progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps,
                          start_step=trainer.step, local_rank=info.local_rank)
    n_params = sum(p.numel() for p in hf_model.parameters())
    hc = hf_model.config
    peak = telemetry.gpu.peak_tflops if telemetry.gpu is not None else None

    def micro_batches_for(step: int) -> list[dict]:
        global_rows = [rows[i] for i in sched.global_rows(step)]
        weights = loss_weights(global_rows, cfg.train.loss_reduction)
        per_rank = cfg.train.global_batch // info.world_size
        lo = info.rank * per_rank
        mine = list(range(lo, lo + per_rank))
        return [collate([global_rows[j] for j in mine[i:i + cfg.train.micro_batch]],
                        [weights[j] for j in mine[i:i + cfg.train.micro_batch]])
                for i in range(0, per_rank, cfg.train.micro_batch)]

    def extra_metrics(step: int, m: dict) -> dict:
        global_rows = [rows[i] for i in sched.global_rows(step)]
        slots = cfg.packing.max_tokens * len(global_rows) if cfg.packing.enabled else m["tokens"]
        out = {"tokens_per_s": m["tokens"] / m["step_time_s"], "pack_utilization": m["tokens"] / slots,
               "epoch": step // sched.steps_per_epoch}
        if peak:
            mean_doc = m["tokens"] / sum(len(r.cu_seqlens) - 1 for r in global_rows)
            fpt = flops_per_token(n_params, hc.num_hidden_layers, hc.hidden_size, mean_doc)
            out["mfu"] = fpt * m["tokens"] / m["step_time_s"] / (peak * 1e12 * info.world_size)
        return out

    evaluate = heldout_evaluator(cfg, info, trainer.model, tok)
    with_eval = eval_hook(cfg, telemetry, evaluate, trainer.step)
    run_steps(cfg, info, trainer, telemetry, micro_batches_for, sft_loss,
              lambda step, m: {**extra_metrics(step, m), **with_eval(step, m)})
    telemetry.close(plot=cfg.logging.plot, keys=("loss", "eval_loss") if evaluate else ("loss",))
    final = save_final_policy(cfg, info, trainer, hf_model, tok, run_dir)
    return {"final": final, "data": dict(counts), "pack_utilization": util}


def _run_megatron(cfg: Config, info, run_dir) -> dict:
    from transformers import AutoTokenizer

    from nova_rt.config import resolve_path
    from nova_rt.models.loading import resolve_model_path
    from nova_rt.stages.sft_megatron import run_megatron_sft

    tok = AutoTokenizer.from_pretrained(resolve_path(cfg, cfg.model.tokenizer) or
                                        resolve_model_path(resolve_path(cfg, cfg.model.path)))
    rows, counts, util = build_sft_rows(cfg, tok)
    if info.is_main:
        log.info("data: %s; %d packed rows, utilization %.2f%%", dict(counts), len(rows), 100 * util)
        if cfg.data.eval_files:
            log.warning("data.eval_files: the held-out loss is not evaluated on the megatron backend (hf only)")
    out = run_megatron_sft(cfg, info, run_dir, rows, tok)
    return {**out, "data": dict(counts), "pack_utilization": util}
