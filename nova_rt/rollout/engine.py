"""Rollout engines behind one interface: our HF decode loop (default) or vLLM, chosen by `grpo.rollout.engine`.

Why two: the HF loop (nova_rt.rollout.generate) needs only transformers and is the fastest on a CPU for small
models; at scale generation dominates a GRPO step and peers sample with vLLM (docs/rollout.md). Both return the same
`Rollout`, so rewards, the loss and the megatron path do not change with the engine.

The contract a stage relies on (`RolloutEngine`): `generate(prompts, group_size, greedy=)` -> Rollout with a prompt's
G responses adjacent; `state_dict()` / `load_state_dict()` for exact resume; `pop_metrics()` -> the metrics of the
rollouts since the last call ({} for the HF loop). The vLLM engine syncs the trainer's weights itself before a
rollout whenever `policy_version()` changed.

The engine-independent pieces (grpo.rollout, Sampling, `policy_token_logprobs` / `logprob_gap`) live in
nova_rt.rollout.base and are re-exported here. This module imports the vLLM engine only inside
build_rollout_engine, and that engine imports nothing from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from nova_rt.errors import UserError
from nova_rt.rollout.base import RolloutConfig, Sampling, logprob_gap, policy_token_logprobs
from nova_rt.rollout.generate import Rollout, RolloutGenerator

__all__ = ["HFEngine", "RolloutConfig", "RolloutEngine", "Sampling", "build_rollout_engine", "logprob_gap",
           "policy_token_logprobs"]


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], group_size: int = 1, *, greedy: bool = False) -> Rollout: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def pop_metrics(self) -> dict: ...

    def close(self) -> None: ...


class HFEngine(RolloutGenerator):
    """The HF decode loop as a RolloutEngine: samples from the training model itself, so nothing to sync."""

    def load_state_dict(self, state: dict) -> None:
        if "rng" not in state:
            raise UserError("grpo.rollout.engine: this checkpoint was written with another rollout engine (its "
                            "sampler state cannot seed the HF loop); resume with the engine it was written with")
        super().load_state_dict(state)

    def pop_metrics(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def build_rollout_engine(cfg: RolloutConfig, model, tokenizer, sampling: Sampling, *,
                         policy_version: Callable[[], int], backend: str = "hf", dtype=None,
                         work_dir=None) -> RolloutEngine:
    """The engine `cfg.engine` names, sampling from `model` (the trainer's HF policy; for the megatron backend, the
    HF copy it gathers its shards into before rollouts). policy_version() changes after every optimizer step.

    vllm with the megatron backend: one engine per rank (rollout TP 1) inside the torchrun worker whose gloo/NCCL
    world megatron set up (vLLM's external_launcher joins it); each syncs from that rank's gathered HF copy
    (tests/rollout/test_vllm_megatron.py: TP=2 on CPU, bit-equal after 2 steps). dtype: model.dtype, the dtype
    rollouts compute in (the HF loop autocasts to it over fp32 master weights, vLLM runs in it); None: the model's.
    work_dir: where vLLM's per-step LoRA adapter directory goes (the run directory; None: a temporary directory)."""
    s = sampling
    if cfg.engine == "hf":
        return HFEngine(model, tokenizer, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                        top_k=s.top_k, seed=s.seed, batch_size=s.batch_size, compute_dtype=dtype)
    if backend not in ("hf", "megatron"):
        raise UserError(f"grpo.rollout.engine: 'vllm' with parallel.backend={backend!r} is not supported "
                        "(use parallel.backend=hf or megatron, or engine=hf)")
    if backend == "megatron" and cfg.tensor_parallel > 1:
        raise UserError("grpo.rollout.tensor_parallel > 1 with parallel.backend=megatron is not supported: the "
                        "megatron stage samples on the first rank of each model-parallel group only, and a vLLM TP "
                        "group needs all its ranks in every generate; use grpo.rollout.tensor_parallel=1")
    if s.temperature != 1.0 and (s.top_k > 0 or s.top_p < 1.0):
        raise UserError("grpo.rollout.engine: 'vllm' returns log-probs after top-k/top-p filtering, so with "
                        "temperature != 1 and top_k/top_p set they would not be the tempered log-probs the "
                        "Rollout contract promises; use temperature 1 or no top-k/top-p")
    from nova_rt.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, model, tokenizer, sampling, policy_version=policy_version, dtype=dtype, work_dir=work_dir)
