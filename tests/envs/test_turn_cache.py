"""KV-cache reuse across turns (nova_rt.rollout.turn_cache, grpo.env.reuse_kv_cache) against the no-reuse path.

The same episodes (G per row, finishing at different turns, EOS likely so that rows leave the decode batch at
different steps, rollout batches chunked) are played twice from the same generator seed: every turn prefilling the
whole conversation, and every later turn feeding only its new tokens on top of the episode's cache. fp64: the
trajectories are the same ids, sampled and greedy, with log-probs equal to 1e-12 (a wrong position, mask or cache
row would change them); fp32: greedy ids equal and log-probs within 1e-5, and the engine's log-probs equal the
teacher-forced policy's on the sampled tokens. The reuse path prefills only a fraction of the prompt tokens.
"""

from __future__ import annotations

import pytest
import torch

from nova_rt.envs import EnvConfig
from nova_rt.models.tiny import build_tiny_model
from nova_rt.rollout.engine import HFEngine
from nova_rt.rollout.multiturn import MultiTurnDriver, trajectory_logprobs
from tests.envs.scripted import GoOn

ROWS = [{"turns": 3}, {"turns": 1}, {"turns": 4}]


def _model(dtype: torch.dtype, eos: int, boost: float = 1.5):
    model = build_tiny_model("llama", seed=5, vocab_size=259, dtype=dtype)
    with torch.no_grad():  # boost 1.5: EOS about 1 in 8 (not 1 in 259): rows leave the batch at different steps
        ids = torch.randint(3, 250, (4, 40), generator=torch.Generator().manual_seed(0))
        mean = model.model(input_ids=ids)[0].mean((0, 1))
        model.get_output_embeddings().weight[eos] += boost * mean / mean.norm()
    return model


def _play(model, tok, *, reuse: bool, greedy: bool, batch_size: int = 0):
    engine = HFEngine(model, tok, max_new_tokens=6, temperature=1.0, seed=11, batch_size=batch_size)
    cfg = EnvConfig(type="user", path="x:y", max_turns=4, max_new_tokens_per_turn=6, max_total_tokens=4000,
                    reuse_kv_cache=reuse)
    driver = MultiTurnDriver(engine, tok, GoOn, cfg)
    assert (driver.turn_cache is not None) == reuse
    return driver.run(ROWS, 1 if greedy else 2, greedy=greedy)


def _compare(a, b, tolerance: float) -> float:
    worst = 0.0
    for x, y in zip(a.trajectories, b.trajectories, strict=True):
        assert (x.token_ids, x.sampled_mask, x.turns) == (y.token_ids, y.sampled_mask, y.turns)
        worst = max([worst] + [abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)])
    assert worst <= tolerance, worst
    return worst


@pytest.mark.parametrize("greedy", [False, True])
def test_reused_cache_equals_full_prefill_fp64(tool_tokenizer, greedy):
    eos = tool_tokenizer.eos_token_id
    model = _model(torch.float64, eos, 0.5 if greedy else 1.5)  # greedy: EOS is not the argmax everywhere
    plain = _play(model, tool_tokenizer, reuse=False, greedy=greedy)
    reused = _play(model, tool_tokenizer, reuse=True, greedy=greedy, batch_size=0)
    _compare(plain, reused, 1e-12)
    chunked = _play(model, tool_tokenizer, reuse=True, greedy=greedy, batch_size=2)
    assert chunked.trajectories[0].token_ids == _play(model, tool_tokenizer, reuse=False, greedy=greedy,
                                                      batch_size=2).trajectories[0].token_ids
    turns = [t.turns for t in plain.trajectories]
    assert max(turns) >= 3 and min(turns) == 1, turns
    sampled = [i for t in plain.trajectories for i, m in zip(t.token_ids, t.sampled_mask) if m]
    assert len(sampled) > sampled.count(eos) * 2 and (greedy or eos in sampled), "no early exits (or EOS only)"
    assert reused.metrics["prompt_tokens"] == plain.metrics["prompt_tokens"]
    assert reused.metrics["cached_tokens"] > plain.metrics["cached_tokens"] + plain.metrics["prompt_tokens"] / 3


def test_reused_cache_fp32_matches_and_logprobs_equal_the_policy(tool_tokenizer):
    greedy_model = _model(torch.float32, tool_tokenizer.eos_token_id, 0.5)
    _compare(_play(greedy_model, tool_tokenizer, reuse=False, greedy=True),
             _play(greedy_model, tool_tokenizer, reuse=True, greedy=True), 1e-5)
    model = _model(torch.float32, tool_tokenizer.eos_token_id)
    sampled = _play(model, tool_tokenizer, reuse=True, greedy=False)
    policy = trajectory_logprobs(model, sampled.trajectories)
    gap = max(abs(p - q) for t, row in zip(sampled.trajectories, policy) for p, q in zip(t.logprobs, row, strict=True))
    assert gap <= 1e-5, gap


def test_rows_with_and_without_a_cache_share_a_batch(tool_tokenizer):
    """One batch of an episode continuing from its cache, a fresh one, and one whose prompt does not extend its
    cache (prefilled whole): the same tokens and log-probs as the engine's full prefill of every prompt."""
    from nova_rt.rollout.turn_cache import TurnCache

    model = _model(torch.float64, tool_tokenizer.eos_token_id, 0.5)
    engine = HFEngine(model, tool_tokenizer, max_new_tokens=6, seed=0)
    cache = TurnCache(engine)
    first = cache.generate([[5, 6, 7, 8], [9, 10, 11]], keys=["a", "c"], greedy=True)
    assert set(cache.entries) == {"a", "c"} and len(cache.entries["a"][0]) == 4 + len(first.response_ids[0]) - 1
    prompts = [[5, 6, 7, 8] + first.response_ids[0] + [40, 41, 42], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31],
               [12, 10, 11] + first.response_ids[1] + [43]]
    before = cache.cached_tokens
    got = cache.generate(prompts, keys=["a", "b", "c"], greedy=True)
    want = engine.generate(prompts, greedy=True)
    assert cache.cached_tokens - before == 4 + len(first.response_ids[0]) - 1  # only "a" reused its cache
    assert got.response_ids == want.response_ids and got.finished == want.finished
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-12
