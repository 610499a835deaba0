"""The optimisation loop shared by every trainable stage: data parallelism, mixed precision, gradient accumulation,
clipping, AdamW with warmup + decay, checkpoints and exact resume, and the non-finite guard.

Non-finite guard: a step whose loss or global gradient norm is NaN/inf applies no update (the data position and the
lr schedule move on, so the bad batch is skipped) and is counted (`nonfinite_skipped`); `train.max_nonfinite_steps`
such steps in a row stop the run with a NonFiniteError (exit 2). No checkpoint is written during such a streak nor
with a non-finite parameter, and no final model from a stopped run (docs/reliability.md#how-the-guards-work).

A stage supplies the module (whose forward computes what its loss needs, so DDP/FSDP see the whole graph) and a
`loss_fn(module, micro_batch) -> (loss, stats)`. Losses are sums with weights already normalised by the *global*
batch (nova_rt.data.packing.loss_weights), so the gradient is the same for one micro-batch, k micro-batches or DP
ranks: DDP averages gradients over ranks, so each rank's loss is multiplied by the world size before backward.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nova_rt import provenance
from nova_rt.checkpoint import CheckpointManager
from nova_rt.config import Config
from nova_rt.data.micro_batch import to_device
from nova_rt.disk import disk_writes, state_nbytes
from nova_rt.distributed import DistInfo, all_reduce_sum, broadcast_object, scoped_group
from nova_rt.errors import CheckpointError, NonFiniteError
from nova_rt.lr_schedule import lr_schedule
from nova_rt.telemetry import nvtx_range

log = logging.getLogger(__name__)


def build_optimizer(params: list[nn.Parameter] | list[tuple[str, nn.Parameter]], cfg: Config, device: torch.device):
    """AdamW, fused where torch has the fused kernel (CUDA and CPU: on a 135M model the CPU fused step is ~7x faster
    than foreach, and it is what HF Trainer / TRL use by default); no weight decay on biases and norm weights."""
    optim_cfg = cfg.optim
    named = [param if isinstance(param, tuple) else ("", param) for param in params]
    decay = [param for _, param in named if param.requires_grad and param.ndim >= 2]
    no_decay = [param for _, param in named if param.requires_grad and param.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    fused = optim_cfg.fused == "true" or (optim_cfg.fused == "auto" and device.type in ("cuda", "cpu"))
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW([group for group in groups if group["params"]], **kwargs)


def wrap_data_parallel(module: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return module
    if cfg.parallel.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                   process_group=scoped_group())
    if cfg.parallel.data_parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in module.lm.get_decoder().layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    raise ValueError(f"parallel.data_parallel must be ddp or fsdp2, got {cfg.parallel.data_parallel!r}")


class NonFiniteGuard:
    """The non-finite policy of the module docstring, shared by Trainer and the megatron backend
    (nova_rt.backends.megatron.MegatronPolicy): counts steps whose loss or gradient
    norm is NaN/inf (their update was skipped by whoever stepped), warns, and stops the run after `limit` in a row.
    Both values are global (reduced over ranks), so every rank counts the same and raises together."""

    def __init__(self, limit: int, is_main: bool, last_checkpoint: Callable[[], Path | None], total: int = 0):
        self.limit, self.is_main, self.last_checkpoint = limit, is_main, last_checkpoint
        self.streak = 0
        """Non-finite steps in a row up to now: while > 0 no checkpoint and no final model is written."""
        self.total = total
        """Non-finite steps in this run (kept across resumes): `nonfinite_skipped` in metrics.jsonl."""

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def count(self, step: int, finite: bool, loss: float, grad_norm: float) -> None:
        """Record optimizer step `step` (1-based), skipped unless `finite` (the verdict every rank shares; loss and
        grad norm are for the warning). A NonFiniteError once `limit` steps in a row were not finite."""
        if finite:
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        if self.is_main:
            log.warning("step %d: non-finite loss %s / grad norm %s: step skipped (no update; %d in a row, %d in "
                        "this run; the run stops after %d in a row)", step, loss, grad_norm, self.streak, self.total,
                        self.limit)
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"steps {step - self.streak + 1}-{step}: loss or gradient norm non-finite {self.streak} steps in a "
                f"row (train.max_nonfinite_steps={self.limit}); stopped without saving. Last checkpoint: "
                f"{self.last_checkpoint() or 'none'}. Lower optim.lr or check the data, then rerun to resume.")

    def refuse_model(self, step: int) -> None:
        """A NonFiniteError while the last step was non-finite: no model is written from such a run."""
        if self.streak > 0:
            raise NonFiniteError(f"step {step}: the run ended with {self.streak} non-finite step(s) in a row; no "
                                 f"model written (last checkpoint: {self.last_checkpoint() or 'none'}). Lower "
                                 "optim.lr or check the data, then rerun to resume.")

    def nonfinite_parameter(self, step: int) -> NonFiniteError:
        return NonFiniteError(f"step {step}: a model parameter is non-finite; neither a checkpoint nor a model is "
                              f"written from it (last checkpoint: {self.last_checkpoint() or 'none'}). Lower optim.lr.")


class LossScaledGuard(NonFiniteGuard):
    """NonFiniteGuard under fp16 loss scaling: a step with a finite loss whose gradients overflowed is the scaler
    probing its scale (skipped, the scale halved, counted in `nonfinite_skipped`), not a stop-worthy streak, while the
    scale is still >= 1; below that the overflow is real and counts as any non-finite step."""

    def __init__(self, limit: int, is_main: bool, last_checkpoint: Callable[[], Path | None], scaler):
        super().__init__(limit, is_main, last_checkpoint)
        self.scaler = scaler

    def count(self, step: int, finite: bool, loss: float, grad_norm: float) -> None:
        if not finite and math.isfinite(loss) and self.scaler.get_scale() >= 1.0:
            self.total += 1
            if self.is_main:
                log.info("step %d: fp16 gradients overflowed at this loss scale: step skipped, loss scale now %g",
                         step, self.scaler.get_scale())
            return
        super().count(step, finite, loss, grad_norm)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, module: nn.Module, *, run_dir: str | Path,
                 params: list | None = None):
        from nova_rt.models.loading import compute_dtype, trained_dtype

        self.cfg, self.info = cfg, info
        self.run_dir = Path(run_dir)
        model_cfg, train_cfg = cfg.model, cfg.train
        self.param_dtype = trained_dtype(model_cfg.dtype, model_cfg.master_weights)
        """Trained parameters and AdamW states: fp32 master weights unless model.master_weights=model_dtype."""
        self.autocast_dtype = compute_dtype(model_cfg.dtype, train_cfg.precision, info.device.type)
        """Compute dtype (None: the parameters' own); table: nova_rt.config.check_precision."""
        self.raw = module.to(info.device)
        with torch.no_grad():  # a module loaded in model.dtype (or a fresh head) becomes fp32 master weights
            for param in self.raw.parameters():
                if param.requires_grad and param.is_floating_point() and param.dtype != self.param_dtype:
                    param.data = param.data.to(self.param_dtype)
        self.trained = None
        """Names of the trained tensors when some parameters are frozen (a LoRA base, nova_rt.models.lora): only
        they are checkpointed and resumed; None: every tensor of the state dict."""
        if any(not param.requires_grad for param in self.raw.parameters()):
            self.trained = {name for name, param in self.raw.named_parameters(remove_duplicate=False)
                            if param.requires_grad}
        self.model = wrap_data_parallel(self.raw, cfg, info)
        self.fsdp = info.distributed and cfg.parallel.data_parallel == "fsdp2"
        self.optimizer = build_optimizer(params or list(self.model.named_parameters()), cfg, info.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg.optim, train_cfg.max_steps))
        self.ckpt = CheckpointManager(self.run_dir, info, cfg.checkpoint.keep_last)
        self.step = 0
        self._provenance: dict | None = None
        self.scaler = torch.amp.GradScaler(info.device.type) if self.autocast_dtype == torch.float16 else None
        """fp16 compute: torch AMP's dynamic loss scaling; its overflow steps are skipped, not counted as a streak."""
        max_nonfinite = train_cfg.max_nonfinite_steps
        self.guard = NonFiniteGuard(max_nonfinite, info.is_main, self.ckpt.latest) if self.scaler is None \
            else LossScaledGuard(max_nonfinite, info.is_main, self.ckpt.latest, self.scaler)

    # ------------------------------------------------------------------------------------------- one step
    def autocast(self):
        """The forward's mixed precision: autocast to the compute dtype over the (fp32 master) parameters."""
        if self.autocast_dtype is None or self.autocast_dtype == self.param_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: times the fp16 loss scale (unchanged without one)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def _unscale_and_clip(self) -> float:
        """Global gradient norm after clipping, with the fp16 loss scale divided out first and updated after (a step
        whose scaled gradients overflowed has an inf norm: the step is skipped and the scale halves)."""
        if self.scaler is None:
            return self._clip()
        self.scaler.unscale_(self.optimizer)
        norm = self._clip()
        self.scaler.update()
        return norm

    def train_step(self, micro_batches: list[dict], loss_fn: Callable) -> dict:
        """Forward/backward every micro-batch of this rank, then one optimizer step. Returns summed stats."""
        t0 = time.perf_counter()
        self.model.train()
        totals: dict[str, float] = {}
        n = len(micro_batches)
        for i, micro_batch in enumerate(micro_batches):
            micro_batch = to_device(micro_batch, self.info.device)  # a PackedBatch (GRPO, DPO) or a dict
            sync = contextlib.nullcontext() if (i == n - 1 or not hasattr(self.model, "no_sync")) \
                else self.model.no_sync()
            with sync:
                with nvtx_range("forward"), self.autocast():
                    loss, stats = loss_fn(self.model, micro_batch)
                with nvtx_range("backward"):
                    self._scaled(loss * self.info.world_size).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.detach().float().item()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + (v.item() if isinstance(v, torch.Tensor) else float(v))
        totals = self._reduce(totals)
        with nvtx_range("optimizer"):
            grad_norm = self._unscale_and_clip()
            lr = self.scheduler.get_last_lr()[0]  # the lr this step applies; scheduler.step() moves to the next
            finite = self.guard.finite(totals.get("loss", 0.0), grad_norm)  # the same on every rank
            if finite:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.guard.count(self.step, finite, totals.get("loss", 0.0), grad_norm)
        totals["nonfinite_skipped"] = self.guard.total
        totals["grad_norm"] = grad_norm
        totals["lr"] = lr
        totals["step_time_s"] = time.perf_counter() - t0
        return totals

    def params_finite(self) -> bool:
        """Every parameter of this rank is finite (all ranks agree when distributed)."""
        bad = torch.zeros((), dtype=torch.float64, device=self.info.device)
        with torch.no_grad():
            for param in self.model.parameters():
                local = param.to_local() if hasattr(param, "to_local") else param
                bad += (~torch.isfinite(local)).sum()
        return all_reduce_sum(bad).item() == 0

    def _clip(self) -> float:
        params = [param for param in self.model.parameters() if param.grad is not None]
        clip = self.cfg.optim.grad_clip
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _reduce(self, totals: dict) -> dict:
        if not self.info.distributed:
            return totals
        keys = sorted(totals)
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.info.device)
        all_reduce_sum(values)
        return dict(zip(keys, values.tolist()))

    # ------------------------------------------------------------------------------------------- checkpoints
    def _trained_only(self, state: dict) -> dict:
        return state if self.trained is None else {k: v for k, v in state.items() if k in self.trained}

    def model_state(self) -> dict | None:
        """The model state, only its trained tensors when some are frozen (rank 0 under FSDP2; collective). A
        NonFiniteError while the last step was skipped as non-finite or a parameter is non-finite: neither a
        checkpoint nor the final model is written from it."""
        self.guard.refuse_model(self.step)
        if not self.params_finite():
            raise self.guard.nonfinite_parameter(self.step)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(self.model,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return self._trained_only(state_dict) if self.info.is_main else None
        return {k: v.detach().cpu() for k, v in self._trained_only(self.raw.state_dict()).items()}

    def optim_state(self) -> dict | None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            state_dict = get_optimizer_state_dict(self.model, self.optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state_dict if self.info.is_main else None
        return self.optimizer.state_dict()

    def save_checkpoint(self, extra: dict | None = None) -> Path | None:
        """Write a checkpoint (collective); None, with a warning, while the last step was skipped as non-finite.
        A non-finite parameter is a NonFiniteError (model_state): such a checkpoint must never replace a good one."""
        if self.guard.streak > 0:
            if self.info.is_main:
                log.warning("step %d: checkpoint not written (the last step was non-finite)", self.step)
            return None
        state = {"scheduler": self.scheduler.state_dict(), "trainer_step": self.step,
                 "nonfinite_total": self.guard.total, **(extra or {})}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        if self.info.is_main:  # rank 0 writes state.pt
            state["provenance"] = self.provenance()
        return self.ckpt.save(self.step, self.model_state(), self.optim_state(), state)

    def provenance(self) -> dict:
        """What this run's checkpoints record (nova_rt.provenance), computed once (the data as the run starts)."""
        if self._provenance is None:
            shapes = ((k, v.shape) for k, v in self.raw.state_dict().items())
            self._provenance = provenance.of_run(self.cfg, provenance.shapes_digest(shapes))
        return self._provenance

    def maybe_resume(self) -> dict | None:
        """Load the newest complete checkpoint if resuming is enabled; returns its extra state (or None). One written
        by another stage, model, data or config is a CheckpointError naming the difference (nova_rt.provenance;
        checkpoint.resume=force: a warning). Then run_dir/config.json, which setup() leaves to an accepted resume."""
        here = self.provenance() if self.info.is_main else None
        found = self.ckpt.load_latest() if self.cfg.checkpoint.resume else None
        if found is not None:
            path, model_sd, optim_sd, state = found
            # every rank loaded the full model.pt; under FSDP2 the module's DTensors carry the global shapes
            provenance.verify(path, state.get("provenance"), here, self.cfg.checkpoint.resume, self.info.is_main,
                              lambda: check_same_shapes(path, self._trained_only(self.raw.state_dict()), model_sd))
        if self.info.is_main and provenance.has_checkpoints(self.run_dir):
            provenance.write_config(self.cfg, self.run_dir)
        if found is None:
            return None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                           options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                    strict=self.trained is None))
        else:
            self.raw.load_state_dict(model_sd, strict=self.trained is None)  # names checked by check_same_shapes
            self.optimizer.load_state_dict(optim_sd)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["trainer_step"]
        self.guard.total = state.get("nonfinite_total", 0)
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.info.is_main:
            log.info("resumed from %s (step %d)", path, self.step)
        return state

    def due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def checkpoint_last_step(self, extra: dict | None = None) -> None:
        """Before the final model (collective): a checkpoint of this step, unless the run resumed from one, so that a
        final write that fails (a full disk) loses no training: the rerun resumes here and only writes the model.
        With checkpoint.resume=false an old run's checkpoint of this step is replaced; keep_last and the non-finite
        guard apply as to any checkpoint."""
        found = self.ckpt.complete() if self.info.is_main else None
        have = broadcast_object(bool(found) and found[-1][0] == self.step and self.cfg.checkpoint.resume)
        if not have:
            self.save_checkpoint(extra)


def check_same_shapes(path: Path, own: dict, saved: dict | None) -> None:
    """CheckpointError naming the first tensor whose name or shape differs between the model and a checkpoint."""
    if saved is None:
        raise CheckpointError(f"{path}: no model.pt (was it written by another stage?)")
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = [name for name in own if name in saved and tuple(own[name].shape) != tuple(saved[name].shape)]
    if not (missing or unexpected or shapes):
        return
    if shapes:
        name = shapes[0]
        what = (f"{name} is {tuple(saved[name].shape)} there, {tuple(own[name].shape)} in this model "
                f"({len(shapes)} differ)")
    else:
        what = f"tensor {(missing or unexpected)[0]!r} is {'missing from' if missing else 'only in'} the checkpoint"
    raise CheckpointError(f"{path}: written by a model of another shape or architecture: {what}. Resume with the "
                          "same model, or start fresh with another run.dir or checkpoint.resume=false")


def save_hf_atomic(hf_model, tokenizer, out_dir: str | Path, state_dict: dict | None = None,
                   then: str | Callable[[], str] = "") -> Path:
    """Write an HF directory to a temporary sibling and rename it into place (an old one is replaced). Lack of space
    removes the temporary one and is a DiskFullError (nova_rt.disk) ending with `then` (what a rerun does)."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    needed = state_nbytes(state_dict if state_dict is not None else hf_model.state_dict())  # save_pretrained empties it
    with disk_writes(out.parent, f"the model {out.name}/", needed=needed, cleanup=[tmp], then=then):
        hf_model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out
