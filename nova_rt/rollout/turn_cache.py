"""KV-cache reuse across the turns of multi-turn episodes in the HF decode loop (grpo.env.reuse_kv_cache).

Without it every turn prefills the whole conversation so far, so prefill grows quadratically with the turns. Here
each episode keeps the keys/values of the tokens the model has already run (its prompt and every sampled token but
the last, which the decode loop never feeds); the next turn, whose prompt extends those ids (checked), feeds only
the rest (the last sampled token and the environment's tokens) on top of them. Episodes with caches of different
lengths share a batch as [padding][cache][padding][new tokens] under an attention mask, with explicit positions, so
each attends to exactly its own tokens at their own positions. Sampling is the engine's (`_next`: the same generator
draws in the same order and batch chunks as its generate), so in exact arithmetic tokens and log-probs equal the
no-reuse path's; in floating point they differ by the rounding of differently shaped matmuls (tests/envs/
test_turn_cache.py: equal to ~1e-12 in fp64). A model whose cache is not a plain DynamicCache (sliding-window
layers) keeps none: each of its turns prefills the whole prompt.

Legend: N rows, C cached length, T new tokens, H kv heads, D head dim, L cache + new.
"""

from __future__ import annotations

import time

import torch

from nova_rt.models.loading import set_attention
from nova_rt.rollout.base import check_generate_args
from nova_rt.rollout.generate import Rollout, RolloutGenerator


class TurnCache:
    """Per-episode caches over an HF RolloutGenerator; `generate(prompts, keys, group_size, greedy=)` is the
    engine's generate where `keys` names each response's episode (its cache is read if the prompt extends it, then
    replaced). `prompt_tokens` / `cached_tokens` count the prompt tokens of every response and those not prefilled."""

    def __init__(self, engine: RolloutGenerator):
        self.engine = engine
        self.entries: dict = {}
        """key -> (the token ids whose keys/values are cached, per layer (keys_HCD, values_HCD))."""
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def drop(self, key) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        self.entries.clear()

    def _cached(self, key, prompt: list[int]):
        entry = self.entries.pop(key, None)
        if entry is None or len(entry[0]) >= len(prompt) or prompt[:len(entry[0])] != entry[0]:
            return None
        return entry

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], keys: list, group_size: int = 1, *, greedy: bool = False) -> Rollout:
        """G responses per prompt (adjacent), keys one per response; with G > 1 the prompts start fresh (the opening
        turn of a group: each prompt is prefilled once and its cache copied to its G rows, as the engine does)."""
        check_generate_args(prompts, group_size)
        engine, model, G, t0 = self.engine, self.engine.model, group_size, time.perf_counter()
        if len(keys) != len(prompts) * G:
            raise ValueError(f"{len(keys)} cache keys for {len(prompts) * G} responses")
        cached = [self._cached(key, prompt) if G == 1 else None for key, prompt in zip(keys, prompts)]
        was_training, impl = model.training, model.config._attn_implementation
        model.eval()
        set_attention(model, "sdpa")
        responses, logprobs = [], []
        try:
            per_call = max(1, engine.batch_size // G) if engine.batch_size > 0 else len(prompts)
            for i in range(0, len(prompts), per_call):
                with engine._autocast():
                    tokens, lps = self._decode(prompts[i:i + per_call], cached[i:i + per_call],
                                               keys[i * G:(i + per_call) * G], G, greedy)
                responses += tokens
                logprobs += lps
        finally:
            set_attention(model, impl)
            model.train(was_training)
        cut = [engine._cut(response) for response in responses]
        return Rollout(prompt_ids=[p for p in prompts for _ in range(G)], response_ids=[c[0] for c in cut],
                       texts=engine.tok.batch_decode([c[0] for c in cut], skip_special_tokens=True),
                       finished=[c[1] for c in cut], logprobs=[lp[:len(c[0])] for lp, c in zip(logprobs, cut)],
                       time_s=time.perf_counter() - t0)

    def _prefill(self, prompts: list[list[int]], cached: list):
        """The batch cache and the logits after each prompt: cached rows feed only their new tokens."""
        from transformers import DynamicCache

        engine, model, device = self.engine, self.engine.model, self.engine.device
        lengths = [len(entry[0]) if entry is not None else 0 for entry in cached]
        new = [prompt[length:] for prompt, length in zip(prompts, lengths)]
        C, N = max(lengths), len(prompts)
        cache = DynamicCache(config=model.config)
        mask_NC = torch.zeros((N, C), dtype=torch.long, device=device)
        if C:
            layers = [entry[1] for entry in cached if entry is not None][0]
            for layer, (keys_HCD, _) in enumerate(layers):
                keys_NHCD = keys_HCD.new_zeros((N, keys_HCD.shape[0], C, keys_HCD.shape[2]))
                values_NHCD = torch.zeros_like(keys_NHCD)
                for row, entry in enumerate(cached):
                    if entry is not None:
                        keys_NHCD[row, :, C - lengths[row]:] = entry[1][layer][0]
                        values_NHCD[row, :, C - lengths[row]:] = entry[1][layer][1]
                cache.update(keys_NHCD, values_NHCD, layer)
            for row, length in enumerate(lengths):
                mask_NC[row, C - length:] = 1
        ids_NT, mask_NT = engine._pad_left(new)
        pos_NT = torch.tensor(lengths, device=device)[:, None] + (mask_NT.cumsum(1) - 1).clamp_min(0)
        out = model(input_ids=ids_NT, attention_mask=torch.cat([mask_NC, mask_NT], 1), position_ids=pos_NT,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.prompt_tokens += sum(len(prompt) for prompt in prompts)
        self.cached_tokens += sum(lengths)
        return cache, out.logits[:, -1], torch.cat([mask_NC, mask_NT], 1), pos_NT[:, -1]

    def _keep(self, cache, row: int, mask_L: torch.Tensor, key, ids: list[int]) -> None:
        """Store batch row `row`'s keys/values at its unmasked positions as episode `key`'s cache of `ids`."""
        where = mask_L.bool()
        if int(where.sum()) != len(ids):
            raise RuntimeError(f"turn cache: {int(where.sum())} cached positions for {len(ids)} ids")
        self.entries[key] = (ids, [(layer.keys[row][:, where].clone(), layer.values[row][:, where].clone())
                                   for layer in cache.layers])

    def _decode(self, prompts: list[list[int]], cached: list, keys: list, G: int, greedy: bool):
        """The engine's decode loop from each row's cache; every row's cache is kept when it leaves the batch."""
        from transformers.cache_utils import DynamicLayer

        engine, model, device = self.engine, self.engine.model, self.engine.device
        cache, logits_NV, mask_NL, pos_N = self._prefill(prompts, cached)
        plain = all(type(layer) is DynamicLayer for layer in cache.layers)
        self.prompt_tokens += (G - 1) * sum(len(prompt) for prompt in prompts)
        self.cached_tokens += (G - 1) * sum(len(prompt) for prompt in prompts)
        logits_NV = logits_NV.repeat_interleave(G, 0)
        if G > 1:
            cache.batch_repeat_interleave(G)
        N = len(prompts) * G
        mask_NL, pos_N = mask_NL.repeat_interleave(G, 0), pos_N.repeat_interleave(G, 0)
        rows = torch.arange(N, device=device)
        eos = torch.tensor(engine.eos, device=device)
        tokens: list[list[int]] = [[] for _ in range(N)]
        logps: list[list[float]] = [[] for _ in range(N)]

        def keep(batch_rows: list[int]) -> None:
            if plain:
                for b in batch_rows:
                    r = int(rows[b])
                    self._keep(cache, b, mask_NL[b], keys[r], list(prompts[r // G]) + tokens[r][:-1])

        for step in range(engine.max_new_tokens):
            tok_N, lp_N = engine._next(logits_NV, greedy)
            for r, t, lp in zip(rows.tolist(), tok_N.tolist(), lp_N.tolist()):
                tokens[r].append(t)
                logps[r].append(lp)
            live = ~torch.isin(tok_N, eos)
            if step + 1 == engine.max_new_tokens or not live.any():
                keep(list(range(len(rows))))
                break
            if not live.all():  # finished rows leave the batch, their caches kept for their next turn
                keep((~live).nonzero()[:, 0].tolist())
                kept = live.nonzero()[:, 0]
                cache.batch_select_indices(kept)
                rows, tok_N, mask_NL, pos_N = rows[kept], tok_N[kept], mask_NL[kept], pos_N[kept]
            mask_NL = torch.cat([mask_NL, mask_NL.new_ones((mask_NL.shape[0], 1))], 1)
            pos_N = pos_N + 1
            out = model(input_ids=tok_N[:, None], attention_mask=mask_NL, position_ids=pos_N[:, None],
                        past_key_values=cache, use_cache=True)
            logits_NV = out.logits[:, -1]
        return tokens, logps
