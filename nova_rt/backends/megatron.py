"""parallel.backend=megatron: the policy is a nova_rt.parallel.MegatronTrainer (TP/PP/SP/VPP/CP on megatron-core),
driven with the HF trainer's lr schedule and non-finite policy.

What differs from the HF backend, by design of megatron-core: the per-token outputs are computed on the last pipeline
stage (vocab-parallel cross entropy at the given temperature; for a score head the final-norm hidden state of each
sequence's last token times the head), micro-batches are dealt over data-parallel ranks (every TP/PP rank of a
replica gets the same ones), SFT's loss is the global token mean only (`calculate_per_token_loss`) over one packed row
per micro-batch, precision follows `model.dtype`, and train.activation_checkpointing k is megatron's full recompute of
k-layer groups inside each model chunk. Checkpoints hold each rank's shards, optimizer and RNG states
(nova_rt.parallel.checkpoint) and a rerun resumes from the newest complete one exactly; the final model is an HF
directory in run.dir/final (for a score head with the `*ForSequenceClassification` config the HF stage writes).
Non-finite policy: a step with a NaN/inf loss or grad norm applies no update (the backend skips it), is counted
(`nonfinite_skipped`) and warned; train.max_nonfinite_steps in a row stop the run with a NonFiniteError; no
checkpoint is written while the last step was non-finite, and no final model either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nova_rt.backends import register_backend
from nova_rt.backends.base import Head
from nova_rt.config import Config, resolve_path
from nova_rt.data.micro_batch import PackedBatch, to_device
from nova_rt.distributed import DistInfo, barrier
from nova_rt.lr_schedule import lr_at
from nova_rt.parallel.packed import from_shifted

log = logging.getLogger("nova_rt")
_FORWARD_CHUNK = 8  # micro-batches per forward-only schedule (all of them are padded to one length and kept on device)


def megatron_trainer(cfg: Config, path: str | None = None, *, trainable: bool = True, **kwargs):
    """MegatronTrainer for cfg.model (or `path`) with cfg.optim and cfg.parallel; trainable=False: frozen reference."""
    from nova_rt.models.loading import resolve_model_path, to_dtype
    from nova_rt.parallel import MegatronTrainer

    o = cfg.optim
    return MegatronTrainer(resolve_model_path(resolve_path(cfg, path or cfg.model.path)), cfg.parallel,
                           dtype=to_dtype(cfg.model.dtype), lr=o.lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                           seed=cfg.run.seed, betas=tuple(o.betas), eps=o.eps, trainable=trainable,
                           recompute_layers=cfg.train.activation_checkpointing if trainable else 0,
                           lora=cfg.lora if trainable else None, source=cfg.source, **kwargs)


def megatron_tokenizer(cfg: Config):
    """The tokenizer of cfg.model.tokenizer, else of the model directory (this backend loads no HF model)."""
    from transformers import AutoTokenizer

    from nova_rt.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_path(cfg, cfg.model.tokenizer) or
                                         resolve_model_path(resolve_path(cfg, cfg.model.path)))


def hf_score_head(model_dir: str, pad_token_id: int | None, seed: int, dtype: torch.dtype):
    """(sequence-classification config, (1, D) initial score weight) as the HF stage builds them: its constructor run
    on a stand-in decoder (one empty parameter of `dtype`), so the config edits and the seeded draw exist once. The
    scalar head (megatron_model.ScoreHead, replicated over TP ranks) thus starts from exactly the HF stage's head for
    the same run.seed, and the final save is a directory AutoModelForSequenceClassification loads."""
    from transformers import AutoConfig

    from nova_rt.models.reward import sequence_classifier_from_causal

    decoder = torch.nn.Module()
    decoder.register_parameter("stand_in", torch.nn.Parameter(torch.empty(0, dtype=dtype)))
    shell = types.SimpleNamespace(config=AutoConfig.from_pretrained(model_dir), get_decoder=lambda: decoder)
    seq_cls = sequence_classifier_from_causal(shell, pad_token_id, seed=seed)
    return seq_cls.config, seq_cls.score.weight.detach().clone()


def score_trainer(cfg: Config, tok):
    """megatron_trainer with head="score", its initial head and the config save_hf writes."""
    from nova_rt.models.loading import resolve_model_path, to_dtype

    model_dir = resolve_model_path(resolve_path(cfg, cfg.model.path))
    config, score_init = hf_score_head(model_dir, tok.pad_token_id, cfg.run.seed, to_dtype(cfg.model.dtype))
    return megatron_trainer(cfg, head="score", score_init=score_init, save_config=config)


def to_megatron_batch(row) -> dict:
    """nova_rt rows carry shifted targets (targets[t] = token t+1); megatron's labels are aligned with input_ids."""
    labels = np.full(row.num_tokens, -100, dtype=np.int64)
    labels[1:] = row.targets[:-1]
    return {"input_ids": torch.from_numpy(row.input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(row.position_ids), "cu_seqlens": torch.from_numpy(row.cu_seqlens)}


def _at_targets(out: dict, targets: torch.Tensor) -> dict:
    """The backend's outputs at the target (response / supervised) tokens only, the layout of the HF backend's
    PolicyLogprobs: per-token ones are selected, the top-k ones already are."""
    from nova_rt.data.chat import IGNORE

    mask = (targets != IGNORE).to(out["logprobs"].device)
    return {k: v[mask] if k in ("logprobs", "entropy") else v for k, v in out.items()}


def _on_targets(fn: Callable) -> Callable:
    """fn(outputs at the targets, micro-batch on the outputs' device) (a policy head: GRPO's objectives)."""
    def wrapped(out: dict, mb: PackedBatch):
        mb = to_device(mb, out["logprobs"].device)
        return fn(_at_targets(out, mb.targets), mb)

    return wrapped


def _cpu(x):
    """Tensors of a forward result moved to the CPU (results travel between pipeline ranks as objects)."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def _megatron_mb(mb: PackedBatch | dict) -> PackedBatch | dict:
    """A dict as MegatronTrainer takes it (SFT rows carry aligned `labels`: to_megatron_batch); a PackedBatch as it is
    (MegatronTrainer shifts its tokens itself and hands the loss functions the PackedBatch)."""
    return from_shifted(mb) if isinstance(mb, dict) and "targets" in mb else mb


def megatron_resume(cfg: Config, backend, run_dir: Path, here: dict | None = None) -> tuple[int, dict | None]:
    """(step, this rank's extra state) of the newest complete megatron checkpoint, loaded into `backend`;
    (0, None) for a fresh run. One of another stage, model, data or config than `here` (default: this run's,
    megatron_provenance) is refused (nova_rt.provenance, as the HF trainer); then run_dir/config.json, which setup()
    leaves to an accepted resume."""
    from nova_rt import provenance
    from nova_rt.parallel import checkpoint as mckpt

    path = mckpt.latest(run_dir / "checkpoints") if cfg.checkpoint.resume else None
    is_main = dist.get_rank() == 0
    if path is not None:
        saved = mckpt.read_meta(path).get("provenance") if is_main else None
        provenance.verify(path, saved, (here or megatron_provenance(cfg, backend)) if is_main else None,
                          cfg.checkpoint.resume, is_main)
    if is_main and provenance.has_checkpoints(run_dir):
        provenance.write_config(cfg, run_dir)
    if path is None:
        return 0, None
    step, extra = mckpt.load(backend, path)
    log.info("resumed from %s (step %d)", path, step)
    return step, extra


def megatron_provenance(cfg: Config, backend) -> dict:
    """This run's provenance (nova_rt.provenance); the parameter digest is of the HF architecture and head, which
    every TP/PP layout shares (a checkpoint may be resumed in another layout)."""
    from nova_rt import provenance

    arch = getattr(backend, "arch", None)
    arch = dataclasses.asdict(arch) if dataclasses.is_dataclass(arch) else {}
    return provenance.of_run(cfg, provenance.shapes_digest(
        [(f"{key}={value}", ()) for key, value in arch.items()] + [(f"head={getattr(backend, 'head', 'lm')}", ())]))


def megatron_guard(cfg: Config, run_dir: Path, start: int):
    """nova_rt.trainer's NonFiniteGuard over megatron checkpoints; a run resumed at `start` continues the count of
    its checkpoint (meta.json `nonfinite_total`)."""
    from nova_rt.parallel import checkpoint as mckpt
    from nova_rt.trainer import NonFiniteGuard

    root = run_dir / "checkpoints"
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    total = int(mckpt.read_meta(root / f"step_{start:08d}").get("nonfinite_total", 0)) if start > 0 else 0
    return NonFiniteGuard(cfg.train.max_nonfinite_steps, is_main, lambda: mckpt.last_complete(root), total)


def save_megatron_final(cfg: Config, info: DistInfo, backend, tokenizer, run_dir: Path, step: int | None = None
                        ) -> str | None:
    """Collective: write the trained weights (and tokenizer) as an HF directory run_dir/final, atomically.
    A non-finite parameter on any rank is a NonFiniteError on every rank, before anything is written. Lack of space
    removes the temporary directory and is a DiskFullError (nova_rt.disk) saying what a rerun does (`step`: the
    policy's; MegatronPolicy.save_final writes a checkpoint of it first)."""
    from nova_rt.disk import disk_writes, resume_hint
    from nova_rt.errors import NonFiniteError
    from nova_rt.parallel import checkpoint as mckpt

    if not cfg.checkpoint.save_final:
        return None
    if not mckpt.all_finite(backend):
        raise NonFiniteError(f"step {cfg.train.max_steps}: a model parameter is non-finite; neither a checkpoint nor "
                             f"a model is written from it (last checkpoint: "
                             f"{mckpt.last_complete(run_dir / 'checkpoints') or 'none'}). Lower optim.lr.")
    final = run_dir / "final"
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    with disk_writes(run_dir, "the model final/", needed=lambda: _model_nbytes(backend), cleanup=[tmp],
                     then=lambda: resume_hint(mckpt.complete(run_dir / "checkpoints"), step)):
        backend.save_hf(tmp)
        if info.is_main:
            tokenizer.save_pretrained(tmp)
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return str(final) if info.is_main else None


def _model_nbytes(backend) -> int:
    """About the size of the full model: this rank's parameter shards times the model-parallel ranks."""
    p = backend.pcfg
    local = sum(t.numel() * t.element_size() for chunk in backend.model for t in chunk.parameters())
    return local * p.tensor_parallel * p.pipeline_parallel


@register_backend("megatron")
class MegatronPolicy:
    """A Policy (nova_rt.backends.base) over a MegatronTrainer: the trainer's lr schedule before each step, the
    non-finite guard after it, checkpoints and resume (nova_rt.parallel.checkpoint), the final HF save. Outputs are
    computed at `temperature` unless a call passes another. A frozen policy (a reference) only runs forward.

    A policy head (GRPO, build(head="policy")): objectives and forward functions see the outputs at the target tokens
    only (the HF backend's PolicyLogprobs layout); rollouts run on an HF copy of the model (`hf_model`), loaded with
    the current weights gathered from the shards before each rollout (sync_generation_model: hf_convert's mapping, a
    full copy on every rank), and only the first rank of each model-parallel group (TP x PP) generates and scores,
    broadcasting the result to the others (once_per_replica), so every rank of a replica trains on identical rollouts
    even where generation is not bitwise reproducible."""

    name = "megatron"
    sft_loss_reductions = ("token",)

    @property
    def sft_heldout_eval(self) -> bool:
        """SFT's held-out loss runs on `forward`, which context parallelism does not support (CP > 1: skipped)."""
        return self.cfg.parallel.context_parallel == 1

    def __init__(self, cfg: Config, trainer, run_dir, temperature: float = 1.0, *, info: DistInfo | None = None,
                 hf_model=None, at_targets: bool = False, start: int = 0, adapters_off: bool = False):
        self.cfg, self.trainer, self.run_dir, self.info = cfg, trainer, Path(run_dir), info
        self.adapters_off = adapters_off
        """Forward with the LoRA adapters disabled: the base model, a LoRA policy's reference on its own shards."""
        self.temperature = temperature
        self.step = start
        """Optimizer steps taken (`start`: the resumed checkpoint step when the caller resumed the trainer itself)."""
        self.guard = megatron_guard(cfg, self.run_dir, start)
        self.at_targets = at_targets
        """A policy head (GRPO): objectives and forward functions see the outputs at the target tokens only."""
        self.hf_model = hf_model
        self._synced_step = 0  # the policy step whose weights hf_model holds
        self._provenance: dict | None = None
        """What its checkpoints record (megatron_provenance), computed once: the data as the run starts."""

    @classmethod
    def build(cls, cfg: Config, info: DistInfo, run_dir: Path, head: Head = "lm"):
        if head == "policy":
            from nova_rt.backends.hf import load_policy

            hf_model, tok = load_policy(cfg)  # the generation copy
            return cls(cfg, megatron_trainer(cfg), run_dir, info=info, hf_model=hf_model, at_targets=True), tok
        tok = megatron_tokenizer(cfg)
        backend = score_trainer(cfg, tok) if head == "score" else megatron_trainer(cfg)
        return cls(cfg, backend, run_dir, info=info), tok

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def dp_rank(self) -> int:
        return self.trainer.dp_rank

    @property
    def dp_size(self) -> int:
        return self.trainer.dp_size

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.dp_group)
        return t

    def model_size(self) -> None:
        return None  # no MFU on this backend

    supports_shared_prefix = False  # megatron's attention takes plain packed rows

    def sync_generation_model(self) -> None:
        """Collective: load the policy's current weights into the HF model that generates (once per step)."""
        if self._synced_step == self.step:
            return
        missing, unexpected = self.hf_model.load_state_dict(self.export_hf_weights(), strict=False)
        allowed = {"lm_head.weight"} if self.trainer.arch.tied else set()
        if unexpected or set(missing) - allowed:
            raise RuntimeError(f"megatron -> HF weight sync: missing {missing}, unexpected {unexpected}")
        self._synced_step = self.step

    def once_per_replica(self, fn: Callable):
        """fn() on the first rank of this model-parallel group, its result broadcast to the others."""
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        box = [fn() if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    def _options(self, options: dict) -> dict:
        options.pop("autocast", None)  # precision is model.dtype on this backend
        return {"temperature": self.temperature, **options}

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self, micro_batches: list, objective, **options) -> dict:
        t0 = time.perf_counter()
        lr = lr_at(self.cfg.optim, self.cfg.train.max_steps, self.step)
        self.trainer.set_lr(lr)
        if objective is not None and self.at_targets:
            objective = _on_targets(objective)
        stats = self.trainer.train_step([_megatron_mb(mb) for mb in micro_batches], objective,
                                        **self._options(options))
        self.step += 1
        self.guard.count(self.step, not self.trainer.update_skipped, stats["loss"], stats["grad_norm"])
        # as Trainer.train_step reports them: the lr this step applied, the run's count of skipped steps
        return {**stats, "lr": lr, "nonfinite_skipped": self.guard.total, "step_time_s": time.perf_counter() - t0}

    def forward(self, micro_batches: list, fn, **options) -> list:
        mbs, opts = [_megatron_mb(mb) for mb in micro_batches], self._options(options)
        run = _on_targets(fn) if self.at_targets else fn
        from nova_rt.parallel.megatron_lora import adapters_disabled

        with adapters_disabled(self.trainer.model) if self.adapters_off else contextlib.nullcontext():
            return [r for i in range(0, len(mbs), _FORWARD_CHUNK) for r in
                    self.trainer.forward(mbs[i:i + _FORWARD_CHUNK], lambda out, mb: _cpu(run(out, mb)), **opts)]

    def reference(self, path: str | None, online: bool = False) -> MegatronPolicy:
        if path is None and self.cfg.lora.rank > 0:  # the base model: the policy's shards with the adapters disabled
            return MegatronPolicy(self.cfg, self.trainer, self.run_dir, self.temperature, info=self.info,
                                  at_targets=self.at_targets, adapters_off=True)
        return MegatronPolicy(self.cfg, megatron_trainer(self.cfg, path, trainable=False), self.run_dir,
                              self.temperature, info=self.info, at_targets=self.at_targets)

    def sft_micro_batches(self, rows: list, schedule, step: int, loss_reduction: str) -> list[dict]:
        """One packed row per micro-batch (the token-mean loss is the backend's own, so no weights)."""
        if loss_reduction != "token":
            raise ValueError("parallel.backend=megatron supports train.loss_reduction=token only")
        return [to_megatron_batch(rows[i]) for mb in schedule.rank_micro_batches(step, self.dp_rank) for i in mb]

    # ------------------------------------------------------------------------------------------- state
    def resume(self) -> dict | None:
        if self.guard.is_main:
            self._provenance = megatron_provenance(self.cfg, self.trainer)
        self.step, extra = megatron_resume(self.cfg, self.trainer, self.run_dir, self._provenance)
        self.guard = megatron_guard(self.cfg, self.run_dir, self.step)
        return extra

    def save_checkpoint(self, extra: dict | None = None):
        """Write a checkpoint (collective); None, with a warning, while the last step was non-finite."""
        from nova_rt.parallel import checkpoint as mckpt

        if self.guard.streak > 0:
            if self.guard.is_main:
                log.warning("step %d: checkpoint not written (the last step was non-finite)", self.step)
            return None
        meta = {"nonfinite_total": self.guard.total}
        if self.guard.is_main:  # rank 0 writes meta.json
            if self._provenance is None:
                self._provenance = megatron_provenance(self.cfg, self.trainer)
            meta["provenance"] = self._provenance
        return mckpt.save(self.trainer, self.run_dir / "checkpoints", self.step, extra,
                          keep_last=self.cfg.checkpoint.keep_last, meta=meta)

    def save_final(self, tokenizer, extra: dict | None = None) -> str | None:
        """The final model, after a checkpoint of the last step (with `extra`) unless the run resumed from one: a
        final write that fails (a full disk) loses no training, the rerun only writes the model."""
        if self.cfg.checkpoint.save_final:
            self.guard.refuse_model(self.step)
            self.checkpoint_last_step(extra)
        return save_megatron_final(self.cfg, self.info, self.trainer, tokenizer, self.run_dir, self.step)

    def checkpoint_last_step(self, extra: dict | None = None) -> None:
        """Collective: a checkpoint of this step unless the run resumed from one (Trainer.checkpoint_last_step)."""
        from nova_rt.distributed import broadcast_object
        from nova_rt.parallel import checkpoint as mckpt

        found = mckpt.last_complete(self.run_dir / "checkpoints")
        have = broadcast_object(found is not None and found.name == f"step_{self.step:08d}"
                                and self.cfg.checkpoint.resume)
        if not have:
            self.save_checkpoint(extra)

    def export_hf_weights(self) -> dict[str, torch.Tensor]:
        return self.trainer.hf_state_dict()
