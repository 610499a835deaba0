"""Rollouts from the current policy: our own batched decode loop on the HF model's KV cache, G samples per prompt.

Why not HF `generate`: it prefills each prompt G times and keeps finished sequences in the batch until the longest
ends. Here each distinct prompt is prefilled once and its KV cache copied to its G samples, and finished rows leave
the batch, so decode cost follows the sum of the response lengths (measured: docs/benchmarks.md#rollout-engines).

Sampling: fp32 logits / temperature, then top-k (ties with the k-th value kept), then top-p (the most likely token
always stays), then one multinomial draw from a private `torch.Generator` (`state_dict()`: reproducible and
resumable apart from the global RNG); greedy takes the argmax. Decoding runs with "sdpa" (batched decoding needs left
padding and a mask, which nova's packed attention does not take) and switches back to the attention it found.
Responses end after their first EOS token (kept: the policy must learn to stop), finished=False at max_new_tokens;
a prompt's G responses are adjacent; `Rollout.logprobs`: per token, at the sampling temperature, before top-k/top-p.

Legend: N sequences in a decode batch, U distinct prompts, P padded prompt length, V vocab.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from nova_rt.models.loading import set_attention
from nova_rt.rollout.base import check_generate_args


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
    logprobs: list[list[float]] = field(default_factory=list)
    """Per response token: log p(token) under the policy at the sampling temperature (no top-k / top-p)."""
    time_s: float = 0.0
    extra: dict = field(default_factory=dict)


def filter_logits(logits_NV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering of (already temperature-scaled) fp32 logits; removed entries become -inf.

    top_k > 0 keeps every logit >= the k-th largest (ties included); top_p < 1 keeps the most likely tokens until
    their probability mass reaches top_p (the token that crosses it stays; the first token always stays; among equal
    logits the lower token id counts as more likely).
    """
    out = logits_NV
    V = out.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_NV, order_NV = torch.sort(out, dim=-1, descending=True, stable=True)  # ties: lower id first
        probs = sorted_NV.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order_NV, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


class RolloutGenerator:
    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, batch_size: int = 0, eos_token_ids: list[int] | None = None,
                 compute_dtype: torch.dtype | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        self.model, self.tok = model, tokenizer
        self.compute_dtype = compute_dtype
        """model.dtype: decoding autocasts to it over fp32 master weights (None: the parameters' dtype)."""
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
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])

    # ------------------------------------------------------------------------------------------- decoding
    def _pad_left(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        P = max(len(p) for p in prompts)
        ids_NP = torch.full((len(prompts), P), self.pad_id, dtype=torch.long)
        mask_NP = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_NP[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_NP[i, P - len(p):] = 1
        return ids_NP.to(self.device), mask_NP.to(self.device)

    def _next(self, logits_NV: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(next token ids (N,), their log-probs at the sampling temperature (N,))."""
        scaled = logits_NV.float() / (1.0 if greedy else self.temperature)
        if greedy:
            tok_N = scaled.argmax(-1)
        else:
            probs = filter_logits(scaled, top_k=self.top_k, top_p=self.top_p).softmax(-1)
            tok_N = torch.multinomial(probs, 1, generator=self.rng)[:, 0]
        lp_N = scaled.log_softmax(-1).gather(1, tok_N[:, None])[:, 0]
        return tok_N, lp_N

    def _decode(self, prompts: list[list[int]], G: int, greedy: bool) -> tuple[list[list[int]], list[list[float]]]:
        """G responses for each of the U distinct prompts (U * G rows, a prompt's rows adjacent)."""
        from transformers import DynamicCache

        model = self.model
        ids_UP, mask_UP = self._pad_left(prompts)
        pos_UP = (mask_UP.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids_UP, attention_mask=mask_UP, position_ids=pos_UP, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        logits_NV = out.logits[:, -1].repeat_interleave(G, 0)
        if G > 1:
            cache.batch_repeat_interleave(G)
        N = len(prompts) * G
        mask_NL = mask_UP.repeat_interleave(G, 0)
        pos_N = pos_UP[:, -1].repeat_interleave(G, 0)
        rows = torch.arange(N, device=self.device)  # which sequence each live batch row is
        eos = torch.tensor(self.eos, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(N)]
        logps: list[list[float]] = [[] for _ in range(N)]
        for step in range(self.max_new_tokens):
            tok_N, lp_N = self._next(logits_NV, greedy)
            for r, t, lp in zip(rows.tolist(), tok_N.tolist(), lp_N.tolist()):
                tokens[r].append(t)
                logps[r].append(lp)
            live = ~torch.isin(tok_N, eos)
            if step + 1 == self.max_new_tokens or not live.any():
                break
            if not live.all():  # finished rows leave the batch
                keep = live.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows, tok_N, mask_NL, pos_N = rows[keep], tok_N[keep], mask_NL[keep], pos_N[keep]
            mask_NL = torch.cat([mask_NL, mask_NL.new_ones((mask_NL.shape[0], 1))], 1)
            pos_N = pos_N + 1
            out = model(input_ids=tok_N[:, None], attention_mask=mask_NL, position_ids=pos_N[:, None],
                        past_key_values=cache, use_cache=True)
            logits_NV = out.logits[:, -1]
        return tokens, logps

    def _cut(self, row: list[int]) -> tuple[list[int], bool]:
        eos = set(self.eos)
        for j, t in enumerate(row):
            if t in eos:
                return row[:j + 1], True
        return row, False

    def _autocast(self):
        if self.compute_dtype in (None, next(self.model.parameters()).dtype):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], group_size: int = 1, *, greedy: bool = False) -> Rollout:
        """G responses per prompt (adjacent). Greedy decoding gives G copies of the argmax continuation."""
        check_generate_args(prompts, group_size)
        t0 = time.perf_counter()
        G = group_size
        was_training, impl = self.model.training, self.model.config._attn_implementation
        self.model.eval()
        set_attention(self.model, "sdpa")
        responses: list[list[int]] = []
        logprobs: list[list[float]] = []
        try:
            per_call = max(1, self.batch_size // G) if self.batch_size > 0 else len(prompts)
            for i in range(0, len(prompts), per_call):
                with self._autocast():
                    toks, lps = self._decode(prompts[i:i + per_call], G, greedy)
                responses += toks
                logprobs += lps
        finally:
            set_attention(self.model, impl)
            self.model.train(was_training)
        cut = [self._cut(r) for r in responses]
        texts = self.tok.batch_decode([c[0] for c in cut], skip_special_tokens=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Rollout(prompt_ids=[p for p in prompts for _ in range(G)], response_ids=[c[0] for c in cut],
                       texts=texts, finished=[c[1] for c in cut],
                       logprobs=[lp[:len(c[0])] for lp, c in zip(logprobs, cut)], time_s=time.perf_counter() - t0)
