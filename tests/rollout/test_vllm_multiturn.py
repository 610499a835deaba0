"""Multi-turn episodes (grpo.env) on the vLLM rollout engine, on CPU with a tiny Llama.

1. Greedy episodes played by vLLM and by the HF decode loop (KV reuse on) are the same transcripts with the same
   token layout: trajectory ids, sampled-token masks (the response_masks the stage trains with) and turn counts equal,
   engine log-probs within 1e-4; the later turns hit vLLM's prefix cache (rollout_prefix_cached_tokens).
2. Sampled episodes (G = 2): the engine's per-token log-probs equal a teacher-forced policy forward on every
   sampled token of the whole trajectory (<= 1e-3, as single-turn rollouts), and env tokens carry none.
3. The GRPO stage through the CLI with grpo.env guess_number and engine vllm: two steps, synced each step, with
   rollout_logprob_abs_diff (whole episodes) <= 1e-3 and the episode metrics logged.
Skipped where vllm is not importable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.rollout import require_vllm  # noqa: E402

require_vllm()

from nova_rt.envs import EnvConfig  # noqa: E402
from nova_rt.models.tiny import build_tiny_model, byte_tokenizer  # noqa: E402
from nova_rt.rollout.engine import HFEngine, RolloutConfig, Sampling, build_rollout_engine  # noqa: E402
from nova_rt.rollout.multiturn import MultiTurnDriver, trajectory_logprobs  # noqa: E402
from tests.envs.conftest import TOOL_CHATML  # noqa: E402
from tests.envs.scripted import GoOn  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = Path(__file__).resolve().parents[2]
TINY = dict(hidden=128, heads=2, kv_heads=1, layers=2, intermediate=256)  # head_dim 64: vLLM's CPU attention
ROWS = [{"turns": 3}, {"turns": 1}, {"turns": 4}]
TURN_TOKENS = 6


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    tok.chat_template = TOOL_CHATML
    model = build_tiny_model("llama", seed=5, vocab_size=259, dtype=torch.float32, **TINY)
    with torch.no_grad():  # EOS about 1 in 50 (not 1 in 259): some turns end early
        ids = torch.randint(3, 250, (4, 40), generator=torch.Generator().manual_seed(0))
        mean = model.model(input_ids=ids)[0].mean((0, 1))
        model.get_output_embeddings().weight[tok.eos_token_id] += 0.7 * mean / mean.norm()
    engine = build_rollout_engine(RolloutConfig(engine="vllm", logprob_check=0), model, tok,
                                  Sampling(max_new_tokens=TURN_TOKENS, temperature=1.0, seed=0),
                                  policy_version=lambda: 0)
    yield tok, model, engine
    engine.close()


def _driver(engine, tok) -> MultiTurnDriver:
    cfg = EnvConfig(type="user", path="x:y", max_turns=4, max_new_tokens_per_turn=TURN_TOKENS, max_total_tokens=1500)
    return MultiTurnDriver(engine, tok, lambda example: GoOn(example, filler=30), cfg)


def test_greedy_episodes_have_the_hf_loops_layout(setup):
    tok, model, engine = setup
    engine.pop_metrics()
    got = _driver(engine, tok).run(ROWS, 1, greedy=True)
    metrics = engine.pop_metrics()
    want = _driver(HFEngine(model, tok, max_new_tokens=TURN_TOKENS, seed=0), tok).run(ROWS, 1, greedy=True)
    assert [t.turns for t in got.trajectories] == [3, 1, 4]
    for a, b in zip(got.trajectories, want.trajectories, strict=True):
        assert (a.token_ids, a.sampled_mask, a.prompt_len) == (b.token_ids, b.sampled_mask, b.prompt_len)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-4
    assert any(not all(t.response_mask) and any(t.response_mask) for t in got.trajectories)  # env tokens inside
    # the opening prompt is > 128 tokens (one CPU block): every later turn finds at least that block cached
    later_turns = sum(t.turns - 1 for t in got.trajectories)
    assert metrics["rollout_prefix_cached_tokens"] >= 128 * later_turns, metrics
    assert metrics["rollout_prompt_tokens"] == want.metrics["prompt_tokens"]


def test_sampled_episode_logprobs_equal_the_policy(setup):
    tok, model, engine = setup
    out = _driver(engine, tok).run(ROWS, 2)
    trajectories = out.trajectories
    assert [t.turns for t in trajectories] == [3, 3, 1, 1, 4, 4]
    assert trajectories[0].token_ids != trajectories[1].token_ids  # seeded per sample: the G episodes differ
    for t in trajectories:
        assert len(t.logprobs) == sum(t.sampled_mask) and t.sampled_mask[:t.prompt_len] == [False] * t.prompt_len
    policy = trajectory_logprobs(model, trajectories)
    gap = max(abs(x - y) for t, row in zip(trajectories, policy) for x, y in zip(t.logprobs, row, strict=True))
    assert gap <= 1e-3, gap


def test_grpo_stage_runs_episodes_on_vllm(tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps({
        "include": str(ROOT / "configs" / "tiny_grpo.yaml"), "run": {"dir": str(tmp_path / "run")},
        "model": {"tiny": {"hidden": 128, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 256}},
        "train": {"max_steps": 2, "num_threads": 1}, "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "plot": False},
        "grpo": {"sampling": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6}, "micro_prompts": 1,
                 "data": {"gym_tasks": [], "system_prompt": "",
                          "prompt_files": [str(ROOT / "data" / "multiturn" / "guess_train.jsonl")],
                          "eval_files": [str(ROOT / "data" / "multiturn" / "guess_eval.jsonl")]},
                 "loss": {"beta": 0.05, "kl": "k3"}, "ptx": {"coef": 0.0}, "eval": {"every": 0},
                 "rollout": {"engine": "vllm", "logprob_check": -1},
                 "env": {"type": "guess_number", "params": {"low": 1, "high": 16}, "max_turns": 3,
                         "max_new_tokens_per_turn": 6, "max_total_tokens": 1600}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "nova_rt.train", "--config", str(config)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["rollout_logprob_abs_diff_max"] <= 1e-3 and 1.0 <= row["turns_mean"] <= 3.0, row
        assert row["rollout_prompt_tokens"] > 0 and "rollout_prefix_cached_tokens" in row, row
        assert row["env_error_frac"] == 0.0 and row["response_len"] <= 18, row
    assert rows[1]["rollout_sync_s"] > 0
