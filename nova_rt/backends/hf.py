"""parallel.backend=hf: the policy is an HF model inside a log-prob (or score) module, trained by
nova_rt.trainer.Trainer (DDP/FSDP2, accumulation, AdamW, the lr schedule, checkpoints, the non-finite guard)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from nova_rt.backends import register_backend
from nova_rt.backends.base import Head
from nova_rt.config import Config, resolve_path
from nova_rt.data.micro_batch import PackedBatch, output_options, to_device
from nova_rt.data.packing import collate, loss_weights
from nova_rt.distributed import DistInfo, all_reduce_sum, barrier
from nova_rt.models.causal import CausalLMLogprobs, PolicyLogprobs, batch_logprobs


def load_policy(cfg: Config, path: str | None = None, *, trainable: bool = False):
    """(hf_model, tokenizer) for cfg.model (or `path`), with attention and activation checkpointing applied; in
    model.dtype, or with `trainable` in the trained dtype (fp32 master weights unless model.master_weights says so)."""
    from nova_rt.models.checkpointing import apply_group_checkpointing
    from nova_rt.models.loading import load_causal_lm, trained_dtype

    m = cfg.model
    dtype = str(trained_dtype(m.dtype, m.master_weights)).removeprefix("torch.") if trainable else m.dtype
    model, tok = load_causal_lm(resolve_path(cfg, path or m.path), dtype=dtype, attn_impl=m.attn_impl,
                                tiny=m.tiny, tokenizer_path=resolve_path(cfg, m.tokenizer), seed=cfg.run.seed)
    model.config.use_cache = False
    if cfg.train.activation_checkpointing > 0:
        apply_group_checkpointing(model.get_decoder().layers, cfg.train.activation_checkpointing)
    return model, tok


def save_final_policy(cfg: Config, info: DistInfo, trainer, hf_model, tokenizer, run_dir: Path,
                      extra: dict | None = None) -> str | None:
    """Write the trained model (the trainer module's `lm.` submodule) as an HF directory in run_dir/final, after a
    checkpoint of the last step (with `extra` state) unless the run resumed from one: a final write that fails (a full
    disk: DiskFullError) loses no training, the rerun only writes the model. With lora.rank > 0 final/ is a PEFT
    adapter directory, and lora.merge_final adds run_dir/final_merged (nova_rt.models.lora).
    Collective: every rank gathers (FSDP2), rank 0 writes; returns the path on rank 0, else None."""
    from nova_rt.disk import resume_hint
    from nova_rt.models.loading import to_dtype
    from nova_rt.trainer import save_hf_atomic

    final = None
    if cfg.checkpoint.save_final:
        trainer.checkpoint_last_step(extra)
        state = trainer.model_state()
        then = lambda: resume_hint(trainer.ckpt.complete(), trainer.step)  # noqa: E731
        if info.is_main and cfg.lora.rank > 0:  # a PEFT adapter directory (+ the merged model with merge_final)
            from nova_rt.models.lora import peft_state, save_adapter_directory, save_merged_directory

            final = save_adapter_directory(hf_model, tokenizer, run_dir / "final", peft_state(state), then)
            if cfg.lora.merge_final:
                merged = save_merged_directory(hf_model, tokenizer, run_dir / "final_merged", to_dtype(cfg.model.dtype),
                                               then)
                set_config_dtype(merged, cfg.model.dtype)
        elif info.is_main:
            final = save_hf_atomic(hf_model, tokenizer, run_dir / "final",
                                   state_dict=final_state(state, cfg.model.dtype), then=then)
            set_config_dtype(final, cfg.model.dtype)
    barrier()
    return str(final) if final else None


def final_state(state: dict, dtype_name: str) -> dict:
    """The trainer module's `lm.` tensors under HF names, floating ones in model.dtype (fp32 masters saved in it)."""
    from nova_rt.models.loading import to_dtype

    dtype = to_dtype(dtype_name)
    return {k[len("lm."):]: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def set_config_dtype(model_dir: str | Path, dtype_name: str) -> None:
    """Make config.json's dtype name the saved weights' dtype (transformers writes the in-memory parameters' one,
    fp32 for master weights); the file is replaced atomically."""
    import json
    import os

    from nova_rt.models.loading import to_dtype

    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    name = str(to_dtype(dtype_name)).removeprefix("torch.")
    if config.get("dtype") == name:
        return
    config["dtype"] = name
    tmp = path.with_name(f".config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def lm_outputs(model, mb: PackedBatch | dict, **options) -> dict:
    """A CausalLMLogprobs' outputs: "logprobs" (T,) aligned with the micro-batch's targets (0 where no target)."""
    return batch_logprobs(model, mb.model_inputs() if isinstance(mb, PackedBatch) else mb, **options)


def score_outputs(model, mb: dict) -> dict:
    """A RewardModel's outputs: "scores" (S,), one per packed sequence."""
    from nova_rt.models.reward import batch_scores

    return {"scores": batch_scores(model, mb)}


def policy_forward(model, mb: PackedBatch, **options) -> dict:
    """Run a (possibly DDP-wrapped) PolicyLogprobs on a micro-batch (its shared-prefix layout too); options:
    temperature, return_entropy, topk_ids."""
    return model(**mb.model_inputs(), shared_prefix=mb.shared_prefix, **options)


def policy_outputs(model, mb: PackedBatch, *, temperature: float = 1.0, entropy: bool = False,
                   at_ref_topk: bool = False, topk: int = 0) -> dict:
    """A PolicyLogprobs' outputs at the target tokens only (GRPO): "logprobs" (N,), "entropy" when asked,
    "topk_logprobs" (N, K) at the reference's top-k ids the micro-batch holds (mb.ref_topk_ids) with at_ref_topk;
    with topk > 0 the reference side of the top-k KL instead: "topk_ids" / "topk_logprobs" (N, topk). A
    micro-batch's own temperature and entropy override the arguments (PTX rows: temperature 1, no entropy)."""
    temperature, entropy = output_options(mb, temperature, entropy)
    if topk:
        from nova_rt.kernels.topk_select import reference_topk

        hidden = model.selected_hidden(**mb.model_inputs(), shared_prefix=mb.shared_prefix)
        weight = model.head_weight(hidden.dtype)
        ids, logprobs = reference_topk(hidden, weight, min(topk, weight.shape[0]), temperature=temperature)
        return {"topk_ids": ids, "topk_logprobs": logprobs}
    return policy_forward(model, mb, temperature=temperature, return_entropy=entropy,
                          topk_ids=mb.ref_topk_ids if at_ref_topk else None)


def sft_objective(out: dict, mb: dict):
    """-sum(w * logp) with global-batch weights (mb["weights"]); stats: real and supervised tokens."""
    loss = -(out["logprobs"] * mb["weights"]).sum()
    return loss, {"tokens": float(mb["input_ids"].numel()), "supervised_tokens": float((mb["targets"] >= 0).sum())}


@register_backend("hf")
class HFPolicy:
    """A Policy (nova_rt.backends.base) over an HF model: `module` is what the Trainer wraps, `outputs(model,
    mb, **options)` runs it on a micro-batch, `save_model` is the HF model whose weights save_final writes (the
    module's `lm.` submodule; for a policy it is also the model rollouts generate with, trained in place).
    trainable=False: no Trainer, forward only (reference() also freezes the weights it loads). With lora.rank > 0 the
    HF model is a peft model (nova_rt.models.lora) whose adapters alone train; adapters_off: the forward runs the base
    model (the reference of a LoRA policy: the same module with its adapters disabled, no second copy)."""

    name = "hf"
    sft_loss_reductions = ("token", "sequence")
    sft_heldout_eval = True

    def __init__(self, cfg: Config, info: DistInfo, module: torch.nn.Module, *, outputs: Callable,
                 run_dir: Path | None = None, save_model=None, trainable: bool = True, autocast: bool = False,
                 adapters_off: bool = False):
        from nova_rt.trainer import Trainer

        self.cfg, self.info, self.outputs, self.save_model = cfg, info, outputs, save_model
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device, self.dp_rank, self.dp_size, self.dp_group = info.device, info.rank, info.world_size, None
        self.trainer = Trainer(cfg, info, module, run_dir=run_dir) if trainable else None
        self.module = self.trainer.raw if self.trainer is not None else module.to(info.device)
        self.hf_model = save_model
        self._autocast_forward = autocast
        self.adapters_off = adapters_off

    @classmethod
    def build(cls, cfg: Config, info: DistInfo, run_dir: Path, head: Head = "lm"):
        lora = cfg.lora if cfg.lora.rank > 0 else None
        hf_model, tok = load_policy(cfg, trainable=lora is None)  # LoRA: the frozen base stays in model.dtype
        if lora is not None:
            from nova_rt.models.lora import add_adapters

            if head != "score":
                hf_model = add_adapters(hf_model, lora, source=cfg.source, seed=cfg.run.seed)
        if head == "policy":  # GRPO: log-probs at the response tokens only; hf_model also generates the rollouts
            return cls(cfg, info, PolicyLogprobs(hf_model), outputs=policy_outputs, run_dir=run_dir,
                       save_model=hf_model), tok
        if head == "score":
            from nova_rt.models.reward import RewardModel

            module = RewardModel.from_causal_lm(hf_model, tok.pad_token_id, seed=cfg.run.seed)
            if lora is not None:  # the score head trains in full next to the adapters
                module.lm = add_adapters(module.lm, lora, source=cfg.source, seed=cfg.run.seed, score_head=True)
            return cls(cfg, info, module, outputs=score_outputs, run_dir=run_dir, save_model=module.lm), tok
        return cls(cfg, info, CausalLMLogprobs(hf_model), outputs=lm_outputs, run_dir=run_dir,
                   save_model=hf_model), tok

    @property
    def step(self) -> int:
        return self.trainer.step

    def autocast(self):
        return self.trainer.autocast() if self.trainer is not None else self._reference_autocast()

    def _reference_autocast(self):
        """The Trainer's compute dtype for a frozen model (held in model.dtype: autocast changes nothing then)."""
        from nova_rt.models.loading import compute_dtype

        precision = self.cfg.train.precision
        dtype = None if precision == "fp32" else compute_dtype(self.cfg.model.dtype, precision, self.device.type)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t)

    @property
    def supports_shared_prefix(self) -> bool:
        """Whether the model's attention takes GRPO's shared-prefix layout (nova_rt.models.attention)."""
        from nova_rt.models.attention import supports_shared_prefix

        return supports_shared_prefix(self.module.lm)

    def sync_generation_model(self) -> None:
        """The HF model that generates is the one trained: nothing to copy."""

    def once_per_replica(self, fn: Callable):
        """fn() on one rank of each data-parallel replica, its result on every rank of it: here every rank is one."""
        return fn()

    def model_size(self) -> tuple[int, int, int]:
        """(parameters, layers, hidden size) of the HF model, for the MFU."""
        hc = self.save_model.config
        return sum(p.numel() for p in self.save_model.parameters()), hc.num_hidden_layers, hc.hidden_size

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self, micro_batches: list, objective, **options) -> dict:
        if objective is None:
            objective = sft_objective
        return self.trainer.train_step(micro_batches,
                                       lambda model, mb: objective(self.outputs(model, mb, **options), mb))

    @torch.no_grad()
    def forward(self, micro_batches: list, fn, *, autocast: bool | None = None, **options) -> list:
        """autocast: run under the trainer's mixed precision (default: only for an online reference)."""
        was_training = self.module.training
        self.module.eval()
        try:
            use = self._autocast_forward if autocast is None else autocast
            ctx = self.autocast() if use else contextlib.nullcontext()
            with ctx, self._adapters():
                out = []
                for mb in micro_batches:
                    mb = to_device(mb, self.device)
                    out.append(fn(self.outputs(self.module, mb, **options), mb))
        finally:
            self.module.train(was_training)
        return out

    def _adapters(self):
        """The context of a forward: the adapters disabled for a LoRA policy's reference."""
        if not self.adapters_off:
            return contextlib.nullcontext()
        from nova_rt.models.lora import adapters_disabled

        return adapters_disabled(self.module.lm)

    def reference(self, path: str | None, online: bool = False) -> HFPolicy:
        if path is None and self.cfg.lora.rank > 0:  # the base model: this module with its adapters disabled
            return HFPolicy(self.cfg, self.info, self.module, outputs=self.outputs, trainable=False, autocast=online,
                            adapters_off=True)
        ref_hf, _ = load_policy(self.cfg, path=path)  # path None: cfg.model, the policy's initial weights
        module = type(self.module)(ref_hf).to(self.device).eval()  # CausalLMLogprobs or PolicyLogprobs
        module.requires_grad_(False)
        return HFPolicy(self.cfg, self.info, module, outputs=self.outputs, trainable=False, autocast=online)

    def sft_micro_batches(self, rows: list, schedule, step: int, loss_reduction: str) -> list[dict]:
        """This rank's share of the global batch, train.micro_batch rows per micro-batch, with global-batch loss
        weights (token or sequence mean)."""
        global_rows = [rows[i] for i in schedule.global_rows(step)]
        weights = loss_weights(global_rows, loss_reduction)
        per_rank, mb = self.cfg.train.global_batch // self.dp_size, self.cfg.train.micro_batch
        mine = list(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        return [collate([global_rows[j] for j in mine[i:i + mb]], [weights[j] for j in mine[i:i + mb]])
                for i in range(0, per_rank, mb)]

    # ------------------------------------------------------------------------------------------- state
    def resume(self) -> dict | None:
        return self.trainer.maybe_resume()

    def save_checkpoint(self, extra: dict | None = None):
        return self.trainer.save_checkpoint(extra)

    def save_final(self, tokenizer, extra: dict | None = None) -> str | None:
        return save_final_policy(self.cfg, self.info, self.trainer, self.save_model, tokenizer, self.run_dir, extra)

    def export_hf_weights(self) -> dict[str, torch.Tensor]:
        if self.cfg.lora.rank > 0:  # the base with the adapters merged in
            from nova_rt.models.lora import merged_state

            return merged_state(self.save_model)
        state = self.trainer.model_state() if self.trainer is not None else self.module.state_dict()
        return {k[len("lm."):]: v.detach().cpu() for k, v in (state or {}).items() if k.startswith("lm.")}
