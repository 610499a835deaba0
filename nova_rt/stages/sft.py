"""SFT on packed chat data: tokenize with the chat template (loss on assistant tokens), pack best-fit-decreasing,
train with the token- or sequence-mean loss over the global batch, save the model as an HF directory."""

from __future__ import annotations

import logging

from nova_rt.config import Config
from nova_rt.data.packing import BatchSchedule, collate, loss_weights, pack_samples
from nova_rt.data.sft import load_sft_samples
from nova_rt.models.causal import CausalLMLogprobs, batch_logprobs
from nova_rt.stages import register_stage
from nova_rt.stages.common import data_files, load_policy, run_steps, save_final_policy, setup
from nova_rt.telemetry import Telemetry, flops_per_token
from nova_rt.trainer import Trainer

log = logging.getLogger("nova_rt.sft")


def sft_loss(model, mb: dict):
    """-sum(w * logp) with global-batch weights; stats: supervised tokens and real tokens."""
    out = batch_logprobs(model, mb)
    loss = -(out["logprobs"] * mb["weights"]).sum()
    return loss, {"tokens": float(mb["input_ids"].numel()), "supervised_tokens": float((mb["targets"] >= 0).sum())}


def build_sft_rows(cfg: Config, tokenizer, files: list[str] | None = None):
    """Samples -> packed rows. Returns (rows, counts, utilization)."""
    d = cfg.data
    if cfg.packing.enabled and d.max_seq_len > cfg.packing.max_tokens:
        raise ValueError(f"data.max_seq_len={d.max_seq_len} exceeds packing.max_tokens={cfg.packing.max_tokens}")
    samples, counts = load_sft_samples(data_files(cfg, files or d.train_files), tokenizer,
                                       max_seq_len=d.max_seq_len, overlong=d.overlong, on_error=d.on_error,
                                       system_prompt=d.system_prompt)
    rows, util = pack_samples(samples, cfg.packing.max_tokens, cfg.packing.enabled)
    return rows, counts, util


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

    run_steps(cfg, info, trainer, telemetry, micro_batches_for, sft_loss, extra_metrics)
    telemetry.close(plot=cfg.logging.plot)
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
    out = run_megatron_sft(cfg, info, run_dir, rows, tok)
    return {**out, "data": dict(counts), "pack_utilization": util}
