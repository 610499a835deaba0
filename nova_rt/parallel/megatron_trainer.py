"""MegatronTrainer: train an HF Llama/Qwen2 checkpoint with megatron-core TP / PP (1F1B, interleaved) / SP / CP / DP.

One process per GPU under torchrun. `train_step(micro_batches[, loss_fn])` runs one optimizer step over this DP rank's
micro-batches (dicts of nova_rt.parallel.packed, or a typed PackedBatch for GRPO / DPO); without loss_fn the loss is
the SFT token mean over the global batch, with it the last pipeline stage hands loss_fn the per-token outputs of
nova_rt.parallel.megatron_outputs (log-probs, entropy, top-k log-probs, or the score head's scalars with
head="score"). `forward` runs forward only (references, old log-probs), `logprobs` one micro-batch's token log-probs;
`save_hf`, `state_dict` and `hf_state_dict` write or gather the weights. A step whose global loss or grad norm is
non-finite applies no update on any rank (`update_skipped`). Parallel sizes come from ParallelConfig; data
parallelism is world / (TP * PP * CP). The whole API, the loss normalisation and the context-parallel rules:
docs/parallelism.md, "The MegatronTrainer API"; `recompute_layers` k: megatron's full activation recompute of groups
of k layers. On CPU (gloo) megatron-core needs the test-only shims of tests/parallel/megatron_cpu_shims.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist

from nova_rt.data.micro_batch import PackedBatch
from nova_rt.parallel import hf_convert, megatron_lora, packed
from nova_rt.parallel.megatron_model import build_model_chunks, hf_arch, transformer_config
from nova_rt.parallel.megatron_outputs import next_token_logprobs, sft_loss, stage_forward, stage_loss, stage_outputs


def _init_distributed(pcfg) -> None:
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    model_parallel = pcfg.tensor_parallel * pcfg.pipeline_parallel * pcfg.context_parallel
    if world % model_parallel:
        raise ValueError(f"parallel: world size {world} is not divisible by tensor_parallel * pipeline_parallel * "
                         f"context_parallel = {model_parallel}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=pcfg.tensor_parallel, pipeline_model_parallel_size=pcfg.pipeline_parallel,
            virtual_pipeline_model_parallel_size=pcfg.virtual_pipeline_parallel or None,
            context_parallel_size=pcfg.context_parallel)


def _check_parallel(arch, pcfg) -> None:
    tp, pp, vpp = pcfg.tensor_parallel, pcfg.pipeline_parallel, pcfg.virtual_pipeline_parallel or 1
    if pcfg.backend != "megatron":
        raise ValueError(f"parallel.backend={pcfg.backend!r}; MegatronTrainer needs 'megatron'")
    if arch.kv_heads % tp or arch.heads % tp:
        raise ValueError(f"parallel.tensor_parallel={tp} must divide num_attention_heads={arch.heads} and "
                         f"num_key_value_heads={arch.kv_heads}")
    if arch.ffn % tp:
        raise ValueError(f"parallel.tensor_parallel={tp} must divide intermediate_size={arch.ffn}")
    if arch.layers % (pp * vpp):
        raise ValueError(f"num_hidden_layers={arch.layers} must be divisible by pipeline_parallel * "
                         f"virtual_pipeline_parallel = {pp * vpp}")
    if pcfg.virtual_pipeline_parallel and pp <= 2:
        # With 2 stages the next and previous stage are the same peer, and the interleaved schedule's batched
        # send/recv pairs activations with gradients (measured: wrong losses on gloo; Megatron-LM used to assert this).
        raise ValueError("parallel.virtual_pipeline_parallel needs pipeline_parallel > 2")
    if pcfg.sequence_parallel and tp < 2:
        raise ValueError("parallel.sequence_parallel needs tensor_parallel >= 2")
    if pcfg.context_parallel < 1:
        raise ValueError(f"parallel.context_parallel={pcfg.context_parallel} must be >= 1")


def recompute_group(arch, pcfg, every: int) -> int:
    """train.activation_checkpointing=k on this backend: groups of k consecutive layers of each model chunk
    recomputed in backward (k >= the chunk's layers: the whole chunk is one group); 0 off. ConfigError when k does
    not divide the chunk's layers (megatron's uniform recompute has no ragged last group, unlike the HF backend's)."""
    from nova_rt.errors import ConfigError

    chunk = arch.layers // (pcfg.pipeline_parallel * (pcfg.virtual_pipeline_parallel or 1))
    if every <= 0:
        return 0
    if every < chunk and chunk % every:
        raise ConfigError(f"train.activation_checkpointing={every} does not divide the {chunk} layers of a model chunk "
                          f"on parallel.backend=megatron (num_hidden_layers={arch.layers} / pipeline_parallel x "
                          f"virtual_pipeline_parallel); use a divisor of {chunk}")
    return min(every, chunk)


CP_SUPPORTED = "supported with context_parallel > 1: SFT (train_step without loss_fn) and logprobs"


def _reject_context_parallel(pcfg, what: str) -> None:
    if pcfg.context_parallel > 1:
        raise NotImplementedError(f"parallel.context_parallel={pcfg.context_parallel}: {what} is not supported by "
                                  f"the megatron backend under context parallelism ({CP_SUPPORTED}; the stage "
                                  "outputs of DPO, GRPO and RM are not gathered over CP ranks)")


class MegatronTrainer:
    """HF checkpoint in, megatron-core model chunks + DDP + optimizer, HF checkpoint out. See the module docstring."""

    def __init__(self, model_dir, parallel_cfg, *, dtype: torch.dtype = torch.float32, lr: float = 1e-5,
                 weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, vocab_multiple: int = 1,
                 use_te: bool | None = None, load_weights: bool = True, trainable: bool = True,
                 head: Literal["lm", "score"] = "lm", score_init: torch.Tensor | None = None, save_config=None,
                 recompute_layers: int = 0, lora=None, source: str = "config"):
        from megatron.core import tensor_parallel
        from transformers import AutoConfig

        self.model_dir, self.pcfg, self.dtype = str(model_dir), parallel_cfg, dtype
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.arch = hf_arch(AutoConfig.from_pretrained(self.model_dir))
        _check_parallel(self.arch, parallel_cfg)
        if head != "lm":
            _reject_context_parallel(parallel_cfg, f"head={head!r} (reward model)")
        _init_distributed(parallel_cfg)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        self.config = transformer_config(self.arch, parallel_cfg, dtype=dtype, cpu=not self.cuda,
                                         init=not load_weights,
                                         recompute_layers=recompute_group(self.arch, parallel_cfg, recompute_layers))
        self.head = head
        self.save_config = save_config  # an HF config save_hf writes instead of the source's config.json (RM)
        chunks = build_model_chunks(self.arch, self.config, vocab_multiple=vocab_multiple, use_te=use_te, head=head)
        chunks = [c.to(self.device) for c in chunks]
        if load_weights:
            self._load(chunks, score_init)
        self.lora = lora if lora is not None and lora.rank > 0 else None
        """The `lora` section when adapters train (nova_rt.parallel.megatron_lora): the base is frozen."""
        if self.lora is not None:
            megatron_lora.add_adapters(chunks, self.arch, lora, seed=seed, source=source,
                                       sequence_parallel=parallel_cfg.sequence_parallel)
        self._divide_by_tokens = True
        self.update_skipped = False
        """The last train_step applied no update: its global loss or grad norm was NaN/inf (the same on every rank)."""
        self.weight_decay = weight_decay
        if not trainable:  # a frozen model (DPO/GRPO reference): forward only, no DDP buffers, no optimizer
            self.model, self.optimizer = [c.requires_grad_(False).eval() for c in chunks], None
            return
        self.model = self._wrap_ddp(chunks)
        self.optimizer = self._build_optimizer(lr, weight_decay, grad_clip, betas, eps)
        self.set_lr(lr)

    # ------------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def _load(self, chunks: list, score_init: torch.Tensor | None) -> None:
        """HF weights into the shards; a score head absent from the checkpoint starts from `score_init` (1, D)."""
        score = hf_convert.SCORE_HEAD
        missing_ok = (score,) if self.head == "score" else ()
        hf_convert.load_hf_into_chunks(chunks, self.model_dir, self.arch, missing_ok=missing_ok)
        if self.head != "score" or score in hf_convert.SafetensorsReader(self.model_dir).weight_map:
            return
        if score_init is None:
            raise ValueError(f"{self.model_dir} has no {score} and no score_init was given for the score head")
        for chunk in chunks:
            if chunk.post_process:
                chunk.output_layer.weight.copy_(score_init.reshape(1, -1))

    def _wrap_ddp(self, chunks: list) -> list:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=self.pcfg.distributed_optimizer)
        model = [DistributedDataParallel(config=self.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
                 for i, c in enumerate(chunks)]
        self.config.finalize_model_grads_func = partial(self._finalize_grads, finalize_model_grads)
        self.config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        return model

    def _finalize_grads(self, finalize, model, num_tokens=None, **kwargs):
        """megatron's finalize_model_grads; the division by the global token count applies to the built-in token-mean
        loss only. Stage losses (train_step's loss_fn) arrive already normalised by their global batch, and megatron
        DDP sums gradients over DP ranks under calculate_per_token_loss, which is exactly their objective."""
        return finalize(model, num_tokens if self._divide_by_tokens else None, **kwargs)

    def _build_optimizer(self, lr, weight_decay, grad_clip, betas, eps):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

        ocfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=betas[0],
                               adam_beta2=betas[1], adam_eps=eps, clip_grad=grad_clip, params_dtype=self.dtype,
                               bf16=self.dtype == torch.bfloat16, fp16=self.dtype == torch.float16,
                               use_distributed_optimizer=self.pcfg.distributed_optimizer)
        # standard overrides: no weight decay on 1-D parameters (norm weights) and biases
        return get_megatron_optimizer(ocfg, self.model, config_overrides=get_standard_config_overrides(ocfg))

    # ------------------------------------------------------------------------------------------- groups
    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_world_size()

    def set_lr(self, lr: float) -> None:
        """Set the learning rate; also applies megatron's per-group multipliers (weight decay off for norms and
        biases), which megatron itself only applies inside its OptimizerParamScheduler."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    # ------------------------------------------------------------------------------------------- steps
    def _rows(self, micro_batches: list) -> list[packed.PackedRow]:
        """The schedule's padded rows; each row's `source` is its micro-batch as passed (a dict or a PackedBatch)."""
        from megatron.core import parallel_state as ps

        multiple = self.pcfg.tensor_parallel if self.config.sequence_parallel else 1
        cp = self.pcfg.context_parallel
        token_dicts = [packed.from_shifted(mb.model_inputs()) if isinstance(mb, PackedBatch) else mb
                       for mb in micro_batches]
        rows = packed.prepare(token_dicts, multiple=multiple, device=self.device, cp=cp,
                              cp_rank=ps.get_context_parallel_rank() if cp > 1 else 0)
        return [replace(row, source=mb) for row, mb in zip(rows, micro_batches)]

    def _vocab(self) -> dict:
        """megatron_outputs' vocab-parallel arguments: the true vocabulary size and the tensor-parallel group."""
        from megatron.core import parallel_state as ps

        return {"vocab_size": self.arch.vocab, "group": ps.get_tensor_model_parallel_group()}

    def _forward_step(self, reduce_fn, data_iterator, model):
        row = next(data_iterator)
        logits = model(input_ids=row.input_ids.unsqueeze(0), position_ids=row.position_ids.unsqueeze(0),
                       attention_mask=None, packed_seq_params=row.packed_seq_params())
        return logits, partial(reduce_fn, row)

    def _run(self, rows, reduce_fn, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, reduce_fn), data_iterator=[iter(rows) for _ in self.model],
            model=self.model, num_microbatches=len(rows),
            seq_length=rows[0].input_ids.numel() * self.pcfg.context_parallel,  # megatron divides it by CP
            micro_batch_size=1, forward_only=forward_only, collect_non_loss_data=forward_only)

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return tensor

    def _broadcast_object(self, obj):
        """`obj` of the last pipeline stage on every rank of the pipeline group."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        return box[0]

    def train_step(self, micro_batches: list, loss_fn=None, *, temperature: float = 1.0,
                   entropy: bool = False, at_ref_topk: bool = False) -> dict:
        """One optimizer step over this DP rank's micro-batches.

        Without `loss_fn`: the token-mean next-token loss (SFT); returns global loss, grad_norm and tokens.
        With `loss_fn(out, mb) -> (loss, stats)`: `out` holds the per-token outputs of micro-batch `mb` (the dict as
        passed in) computed on the last pipeline stage (megatron_outputs.token_outputs; logits / `temperature`,
        "entropy" when asked, with at_ref_topk "topk_logprobs" at the micro-batch's ref_topk_ids where set), and
        `loss` is that micro-batch's share of the global objective, already normalised by the global batch
        (nova_rt.trainer's convention): gradients are summed over micro-batches and DP ranks.
        Returns {"loss", "grad_norm", *stats}, each summed over micro-batches and DP ranks, on every rank.
        A step whose loss or grad norm is NaN/inf applies no update on any rank (`_step_if_finite`); its values are
        returned as they are, for the stage loop's non-finite guard (nova_rt.trainer.NonFiniteGuard).
        """
        from megatron.core import parallel_state as ps

        if self.optimizer is None:
            raise RuntimeError("train_step on a frozen MegatronTrainer (trainable=False)")
        if loss_fn is None and self.head != "lm":
            raise ValueError(f"train_step without loss_fn is the next-token loss; this backend has head={self.head!r}")
        if loss_fn is not None:
            _reject_context_parallel(self.pcfg, "train_step with a stage loss_fn (DPO, GRPO)")
        rows = self._rows(micro_batches)
        if self.pcfg.virtual_pipeline_parallel and len(rows) < self.pcfg.pipeline_parallel:
            raise ValueError(f"train_step got {len(rows)} micro-batches; the interleaved pipeline schedule needs at "
                             f"least pipeline_parallel={self.pcfg.pipeline_parallel} per step")
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._divide_by_tokens = loss_fn is None
        row_outputs = partial(stage_outputs, head=self.head, temperature=temperature, entropy=entropy,
                              at_ref_topk=at_ref_topk, **self._vocab())
        reduce_fn = partial(sft_loss, **self._vocab()) if loss_fn is None else partial(stage_loss, loss_fn, row_outputs)
        outputs = self._run(rows, reduce_fn, forward_only=False)
        totals: dict[str, float] = {}
        for o in outputs or []:  # last pipeline stage
            for k, v in o.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        keys = sorted(self._broadcast_object(sorted(totals)))
        stats = torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.device)
        stats = self._from_last_stage(stats)
        # SFT's sums cover this CP rank's tokens only: reduce them over DP x CP (the DP group when CP == 1)
        dist.all_reduce(stats, group=ps.get_data_parallel_group(with_context_parallel=loss_fn is None))
        totals = dict(zip(keys, stats.tolist()))
        if loss_fn is None:
            tokens = int(totals["tokens"])
            loss = totals["loss_sum"] / max(tokens, 1)
            return {"loss": loss, "grad_norm": self._step_if_finite(loss), "tokens": tokens}
        return {**totals, "grad_norm": self._step_if_finite(totals.get("loss", 0.0))}

    @torch.no_grad()
    def _step_if_finite(self, loss: float) -> float:
        """megatron's optimizer step (ChainedOptimizer.step: main grads, global grad norm, clip by it, update),
        skipped when the global loss or grad norm is NaN/inf: nova_rt.trainer's non-finite policy (the stage loop
        counts such steps and stops the run). Both values should be the same on every rank; the verdict is still
        max-reduced over all ranks into `update_skipped`, so a skip is collective and every rank counts it even if
        one rank alone saw a non-finite value. Returns the grad norm (before clipping). With fp16's loss scaler an
        overflow (prepare_grads: found_inf) is a skipped step too, grad norm inf."""
        from megatron.core.optimizer import optimizer as mopt  # clip via the module attribute: CPU tests shim it

        found_inf = self.optimizer.prepare_grads()
        grad_norm = float("inf") if found_inf else float(self.optimizer.get_grad_norm())
        bad = torch.tensor(float(not (math.isfinite(loss) and math.isfinite(grad_norm))), device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.update_skipped = bool(bad.item())
        if self.update_skipped:
            return grad_norm
        for opt in self._megatron_optimizers():
            params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
            if params and opt.config.clip_grad > 0.0:
                mopt.clip_grad_by_total_norm_fp32(params, opt.config.clip_grad, grad_norm,
                                                  opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()
        return grad_norm

    @torch.no_grad()
    def forward(self, micro_batches: list, fn, *, temperature: float = 1.0, entropy: bool = False,
                at_ref_topk: bool = False, topk: int = 0) -> list:
        """[fn(out, mb) for each micro-batch] without an update (eval mode); `out` as in `train_step`, plus, with
        topk > 0, the reference side of the top-k KL: "topk_ids" / "topk_logprobs" (N, topk) at the N target
        positions. The results (any picklable value) come from the last pipeline stage and are returned on every
        rank."""
        if topk and at_ref_topk:
            raise ValueError("forward: pass topk (the best ids) or at_ref_topk (given ids), not both")
        _reject_context_parallel(self.pcfg, "forward (stage outputs: reference / old log-probs, scores)")
        rows = self._rows(micro_batches)
        n = len(rows)
        if self.pcfg.virtual_pipeline_parallel and n < self.pcfg.pipeline_parallel:  # the interleaved schedule
            rows = rows + [rows[-1]] * (self.pcfg.pipeline_parallel - n)  # needs >= PP micro-batches: repeat one
        was_training = [c.training for c in self.model]
        for chunk in self.model:
            chunk.eval()
        try:
            row_outputs = partial(stage_outputs, head=self.head, temperature=temperature, entropy=entropy,
                                  at_ref_topk=at_ref_topk, topk=topk, **self._vocab())
            outputs = self._run(rows, partial(stage_forward, fn, row_outputs), forward_only=True)
        finally:
            for chunk, mode in zip(self.model, was_training):
                chunk.train(mode)
        return self._broadcast_object(list(outputs[:n]) if outputs else None)

    @torch.no_grad()
    def logprobs(self, micro_batch: dict) -> torch.Tensor:
        """(T,) fp32 log p(input_ids[t] | earlier tokens of its document); 0 at document starts. No update."""
        from megatron.core import parallel_state as ps

        if self.head != "lm":
            raise ValueError(f"logprobs needs the LM head; this backend has head={self.head!r}")
        rows = self._rows([micro_batch])
        if self.pcfg.virtual_pipeline_parallel:  # the interleaved schedule needs >= PP micro-batches: repeat it
            rows = rows * self.pcfg.pipeline_parallel
        for chunk in self.model:
            chunk.eval()
        try:
            logprob_fn = partial(next_token_logprobs, context_group=ps.get_context_parallel_group(), **self._vocab())
            outputs = self._run(rows, logprob_fn, forward_only=True)
        finally:
            for chunk in self.model:
                chunk.train()
        out = outputs[0] if outputs else torch.zeros(rows[0].length, dtype=torch.float32, device=self.device)
        return self._from_last_stage(out.contiguous()).cpu()

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """This rank's model shards, optimizer state and RNG states (python, numpy, torch, CUDA and megatron's
        tracker): with the stage's data position, everything an exact resume needs (nova_rt.parallel.checkpoint).
        With parallel.distributed_optimizer a collective over DP (see `_optimizer_state`)."""
        from megatron.core import tensor_parallel

        from nova_rt.checkpoint import rng_state

        return {"model": [megatron_lora.trainable_state(c) if self.lora else getattr(c, "module", c).state_dict()
                          for c in self.model],
                "optimizer": self._optimizer_state(),
                "rng": {**rng_state(), "megatron": tensor_parallel.get_cuda_rng_tracker().get_states()}}

    def _optimizer_state(self):
        """The optimizer's state; with the distributed optimizer a collective over DP (gloo): per megatron optimizer,
        its unsharded part (param groups, Adam step) and megatron's dp-zero parameter state: the DP shards of the
        main params and Adam moments gathered on DP rank 0 in grad-buffer order (None on the other DP ranks)."""
        if self.optimizer is None or not self.pcfg.distributed_optimizer:
            return self.optimizer.state_dict() if self.optimizer is not None else None
        return {"distributed": [{"common": o.state_dict(), "param_state": o.get_parameter_state_dp_zero()}
                                for o in self._megatron_optimizers()]}

    def _megatron_optimizers(self) -> list:
        """The DistributedOptimizers inside get_megatron_optimizer's ChainedOptimizer (one per param dtype/group)."""
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    @torch.no_grad()  # the dp-zero load copies into fp32 main params, which are views of the model's parameters
    def _load_distributed_optimizer(self, states: list[dict]) -> None:
        """Inverse of `_optimizer_state` (collective over DP). Two fixes for megatron-core 0.16.1 with torch's own
        Adam (no Apex/TE, which keep no per-parameter step): DistributedOptimizer.load_state_dict gives every
        parameter the *same* `step` tensor, which Adam then increments in place once per parameter (tiny test
        model: step 30 instead of 4 two steps after a resume at step 2), and load_parameter_state_from_dp_zero
        copies every state key, `step` included, which the dp-zero state lacks (KeyError). So the steps are set
        aside for that load, and each parameter gets its own copy back."""
        opts = self._megatron_optimizers()
        if len(states) != len(opts):
            raise ValueError(f"checkpoint holds {len(states)} distributed optimizers, this rank has {len(opts)}")
        for opt, state in zip(opts, states):
            opt.load_state_dict(state["common"])
            inner = opt.optimizer.state
            steps = {p: s.pop("step") for p, s in inner.items() if "step" in s}
            try:
                opt.load_parameter_state_from_dp_zero(state["param_state"])
            finally:
                for p, step in steps.items():
                    inner[p]["step"] = step.clone()

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (same parallel layout); collective with the distributed optimizer."""
        from megatron.core import tensor_parallel

        from nova_rt.checkpoint import set_rng_state

        if len(state["model"]) != len(self.model):
            raise ValueError(f"checkpoint holds {len(state['model'])} model chunks, this rank has {len(self.model)}")
        sharded = isinstance(state["optimizer"], dict) and "distributed" in state["optimizer"]
        if self.optimizer is not None and sharded != self.pcfg.distributed_optimizer:
            raise ValueError(f"checkpoint was written with parallel.distributed_optimizer={sharded}; this run has "
                             f"{self.pcfg.distributed_optimizer} (resume with the same setting)")
        for chunk, sd in zip(self.model, state["model"]):
            if self.lora is not None:  # adapters only; the frozen base is the one loaded from model_dir
                megatron_lora.load_trainable_state(chunk, sd)
            else:
                getattr(chunk, "module", chunk).load_state_dict(sd)
        if self.optimizer is not None and self.pcfg.distributed_optimizer:
            self._load_distributed_optimizer(state["optimizer"]["distributed"])
        elif self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng"]["megatron"])

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the full HF state dict (CPU tensors) on every rank, e.g. to sync an HF generation model.
        Gathers every shard of data-parallel replica 0 to every rank: one full copy of the model per rank."""
        from megatron.core import parallel_state as ps

        first_copy = ps.get_data_parallel_rank(with_context_parallel=True) == 0  # CP ranks hold copies too
        mine = hf_convert.local_pieces(self.model, self.arch) if first_copy else []
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        pieces = [p for rank_pieces in gathered for p in rank_pieces]
        return hf_convert.assemble(pieces, self.arch, ps.get_tensor_model_parallel_world_size())

    def save_hf(self, out_dir) -> None:
        """Collective: write the current weights as an HF directory (global rank 0 writes); with LoRA the PEFT
        adapter directory of the HF backend."""
        if self.lora is not None:
            megatron_lora.save_adapter_directory(self.model, self.lora, megatron_lora.targets_of(self.lora, ""),
                                                 self.model_dir, out_dir)
            dist.barrier()
            return
        written = hf_convert.save_chunks_as_hf(self.model, self.arch, self.model_dir, out_dir)
        if written is not None and self.save_config is not None:
            self.save_config.save_pretrained(written)
        dist.barrier()
