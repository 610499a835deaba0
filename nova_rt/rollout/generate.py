"""Rollouts from the current policy: batched HF `generate` with a KV cache, G samples per prompt.

Why the attention switch: training runs nova's packed attention (one flat row, cu_seqlens, no mask), but batched
generation needs left padding and therefore a padding mask, which the packed path does not take. Each call switches
the model to "sdpa", generates, and switches back to the implementation it found.

Why a private RNG: sampling should be reproducible and resumable independently of whatever else draws from torch's
global generator (dropout, data order). HF `generate` samples from the global generator, so each call forks the
global RNG, loads this object's state into it, generates, and stores the advanced state back; the global stream is
left untouched. `state_dict()` holds that state for checkpoints.

Responses are cut after the first end-of-sequence token (which is kept: the policy must learn to stop); a response
that hit max_new_tokens has finished=False. Prompts are repeated G times, so a prompt's samples are adjacent
(what grpo_loss expects of a group).

Legend: N sequences in a generate call, P padded prompt length.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from nova_rt.models.loading import set_attention


@dataclass
class Rollout:
    prompt_ids: list[list[int]]
    """One per response: the prompt it continues (a prompt's G responses are adjacent)."""
    response_ids: list[list[int]]
    """Generated tokens, cut after the first EOS (kept)."""
    texts: list[str]
    """Decoded responses without special tokens."""
    finished: list[bool]
    """True when the response ended with an EOS token (False: truncated at max_new_tokens)."""
    time_s: float = 0.0
    extra: dict = field(default_factory=dict)


class RolloutGenerator:
    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, batch_size: int = 0, eos_token_ids: list[int] | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.batch_size = batch_size
        eos = set(eos_token_ids or [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else []))
        if not eos:
            raise ValueError("the tokenizer has no eos_token_id; pass eos_token_ids")
        self.eos = sorted(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.device = next(model.parameters()).device
        with self._forked():
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            else:
                torch.manual_seed(seed)
            self._state = self._get_global()

    # ------------------------------------------------------------------------------------------- RNG
    def _forked(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _get_global(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set_global(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def state_dict(self) -> dict:
        return {"rng": self._state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._state = state["rng"].clone()

    # ------------------------------------------------------------------------------------------- generation
    def _generation_config(self, greedy: bool):
        from transformers import GenerationConfig

        sample = not greedy
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=sample,
                                temperature=self.temperature if sample else None,
                                top_p=self.top_p if sample else None, top_k=self.top_k if sample else None,
                                eos_token_id=self.eos, pad_token_id=self.pad_id, use_cache=True)

    def _pad_left(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        P = max(len(p) for p in prompts)
        ids_NP = torch.full((len(prompts), P), self.pad_id, dtype=torch.long)
        mask_NP = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                ids_NP[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
                mask_NP[i, P - len(p):] = 1
        return ids_NP.to(self.device), mask_NP.to(self.device)

    def _cut(self, row: list[int]) -> tuple[list[int], bool]:
        eos = set(self.eos)
        for j, t in enumerate(row):
            if t in eos:
                return row[:j + 1], True
        return row, False

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], group_size: int = 1, *, greedy: bool = False) -> Rollout:
        """G responses per prompt (adjacent). Greedy decoding ignores group_size's randomness but repeats."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        t0 = time.perf_counter()
        seqs = [p for p in prompts for _ in range(group_size)]
        gen_cfg = self._generation_config(greedy)
        was_training, impl = self.model.training, self.model.config._attn_implementation
        use_cache = self.model.config.use_cache
        self.model.eval()
        set_attention(self.model, "sdpa")
        self.model.config.use_cache = True
        responses: list[list[int]] = []
        try:
            rng_ctx = contextlib.nullcontext() if greedy else self._forked()
            with rng_ctx:
                if not greedy:
                    self._set_global(self._state)
                step = self.batch_size if self.batch_size > 0 else len(seqs)
                for i in range(0, len(seqs), step):
                    ids_NP, mask_NP = self._pad_left(seqs[i:i + step])
                    out = self.model.generate(input_ids=ids_NP, attention_mask=mask_NP, generation_config=gen_cfg)
                    responses += out[:, ids_NP.shape[1]:].tolist()
                if not greedy:
                    self._state = self._get_global()
        finally:
            self.model.config.use_cache = use_cache
            set_attention(self.model, impl)
            self.model.train(was_training)
        cut = [self._cut(r) for r in responses]
        texts = self.tok.batch_decode([c[0] for c in cut], skip_special_tokens=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Rollout(prompt_ids=seqs, response_ids=[c[0] for c in cut], texts=texts,
                       finished=[c[1] for c in cut], time_s=time.perf_counter() - t0)
