"""What a stage drives of a trained policy, whatever runs it (Policy), and the one step loop over it.

A stage builds its data as packed micro-batches (nova_rt.data.packing.collate's layout, `targets` shifted): typed ones
(nova_rt.data.micro_batch.PackedBatch: GRPO, DPO) or dicts of collate's keys (SFT, RM), and writes its loss once:

    objective(outputs: dict, micro_batch) -> (loss, stats)

`outputs`: "logprobs" (T,) aligned with the targets for an LM head, "scores" (S,) for a score head; with a GRPO
step's options ("temperature", "entropy", "at_ref_topk"), the log-probs / entropy / top-k log-probs at the targets.
`loss` is the micro-batch's share of the global objective, already normalised by the global batch (nova_rt.trainer),
so a backend sums gradients over micro-batches and data-parallel ranks. Backends: nova_rt.backends.hf and
nova_rt.backends.megatron; a new one implements Policy and registers with @register_backend(name)
(nova_rt/backends/__init__.py; docs/architecture.md#policy-backends).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from nova_rt.config import Config
from nova_rt.distributed import DistInfo
from nova_rt.telemetry import Telemetry

Objective = Callable[[dict, Any], tuple[torch.Tensor, dict]]
Head = Literal["lm", "score", "policy"]
"""What a policy's outputs are: per-token log-probs, a reward model's scalar, GRPO's outputs at the targets."""


class Policy(Protocol):
    """A trainable (or frozen) policy on one backend. Every method is collective over the ranks that hold the policy
    unless it says otherwise."""

    name: str
    """The parallel.backend value it is registered under."""
    sft_loss_reductions: tuple[str, ...]
    """The train.loss_reduction values its SFT objective supports."""
    sft_heldout_eval: bool
    """Whether the SFT stage evaluates data.eval_files on it (megatron: not with context_parallel > 1)."""
    step: int
    """Optimizer steps taken; after resume(), the checkpoint's."""
    device: torch.device
    dp_rank: int
    dp_size: int
    dp_group: Any
    """Process group of the data-parallel ranks (None: every rank is a data-parallel rank)."""
    hf_model: Any
    """The HF model rollouts generate with (head "policy"); see sync_generation_model."""
    supports_shared_prefix: bool
    """Whether micro-batches may use GRPO's shared-prefix layout (nova_rt.models.attention)."""

    @classmethod
    def build(cls, cfg: Config, info: DistInfo, run_dir: Path, head: Head = "lm") -> tuple[Policy, Any]:
        """(trainable policy of cfg.model, tokenizer); head "lm" (per-token log-probs), "score" (a reward model's
        scalar) or "policy" (GRPO: outputs at the target tokens only, and `hf_model` for the rollout engines)."""

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` in place over the data-parallel ranks; returns it."""

    def model_size(self) -> tuple[int, int, int] | None:
        """(parameters, layers, hidden size) for the MFU, or None where not reported."""

    def train_step(self, micro_batches: list, objective: Objective | None, **options) -> dict:
        """One optimizer step over this rank's micro-batches: {"loss", "grad_norm", "lr", "nonfinite_skipped",
        "step_time_s", *stats summed over micro-batches and ranks}. objective None: the token-mean next-token loss
        of micro-batches made by sft_micro_batches. A NaN/inf step applies no update and is counted (the trainer's
        non-finite guard)."""

    def forward(self, micro_batches: list, fn: Callable[[dict, Any], Any], **options) -> list:
        """[fn(outputs, mb) for mb in micro_batches], without gradients, in eval mode (the results on every rank).
        Options: temperature, entropy, at_ref_topk (log-probs at the micro-batch's ref_topk_ids), topk (the best
        ids), autocast (HF only)."""

    def reference(self, path: str | None, online: bool = False) -> Policy:
        """A frozen policy of `path` (None: cfg.model, the initial weights) for reference log-probs; online: it runs
        on every step's micro-batches (the HF backend then runs it under the trainer's autocast)."""

    def sft_micro_batches(self, rows: list, schedule, step: int, loss_reduction: str) -> list[dict]:
        """This rank's micro-batches of SFT step `step` (packed rows, nova_rt.data.packing.BatchSchedule) for
        train_step(..., objective=None)."""

    def sync_generation_model(self) -> None:
        """Make hf_model hold the current weights (export_hf_weights; a no-op where it is the trained model)."""

    def once_per_replica(self, fn: Callable[[], Any]) -> Any:
        """fn() on one rank of each data-parallel replica (e.g. rollouts), its result returned on all its ranks."""

    def resume(self) -> dict | None:
        """Load the newest complete checkpoint when checkpoint.resume; returns this rank's extra state (or None)."""

    def save_checkpoint(self, extra: dict | None = None) -> Path | None:
        """Write a checkpoint with `extra` state; None (with a warning) while the last step was non-finite."""

    def save_final(self, tokenizer, extra: dict | None = None) -> str | None:
        """Write the trained model as an HF directory run_dir/final when checkpoint.save_final (path on rank 0), after
        a checkpoint of the last step with `extra` state unless the run resumed from one (a failed final write loses
        no training)."""

    def export_hf_weights(self) -> dict[str, torch.Tensor]:
        """The full current weights with HF names (CPU tensors, gathered on every rank), e.g. for a rollout engine."""


def run_steps(cfg: Config, policy: Policy, telemetry: Telemetry,
              micro_batches_for: Callable[[int], list[dict]], objective: Objective | None,
              extra_metrics: Callable[[int, dict], dict] | None = None, checkpoint_extra: Callable | None = None,
              **options) -> None:
    """The step loop of supervised stages (SFT, RM, DPO) on any backend: train, log, checkpoint every
    checkpoint.every steps (the data position is the step: batches are a function of it)."""
    every = cfg.checkpoint.every
    while policy.step < cfg.train.max_steps:
        step = policy.step
        t0 = time.perf_counter()
        metrics = policy.train_step(micro_batches_for(step), objective, **options)
        if extra_metrics is not None:
            metrics.update(extra_metrics(step, metrics))
        metrics["step_time_s"] = time.perf_counter() - t0
        telemetry.log(policy.step, metrics)
        if every > 0 and policy.step % every == 0 and policy.step < cfg.train.max_steps:
            policy.save_checkpoint(checkpoint_extra() if checkpoint_extra else None)
