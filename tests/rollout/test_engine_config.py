"""grpo.rollout (nova_rt/rollout/engine.py): the engine choice, its errors and the pieces that need no vllm.

Runs everywhere (CI's .venv has no vllm): the HF loop stays the default behind the same interface; asking for vllm
where it is missing, with a backend it does not support, or with sampling whose log-probs it cannot return is one
line naming the key; bucketing and the log-prob gap metric against hand-computed values.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from nova_rt.config import ConfigError, load_config
from nova_rt.errors import UserError
from nova_rt.models.tiny import build_tiny_model, byte_tokenizer
from nova_rt.rollout.engine import (
    HFEngine,
    RolloutConfig,
    Sampling,
    build_rollout_engine,
    logprob_gap,
    policy_token_logprobs,
)
from nova_rt.rollout.vllm_engine import weight_buckets

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart_grpo.yaml"


def test_default_is_the_hf_loop():
    cfg = load_config(QUICKSTART)
    assert cfg.grpo.rollout.engine == "hf"
    m = build_tiny_model("llama", seed=0)
    eng = build_rollout_engine(cfg.grpo.rollout, m, byte_tokenizer(), Sampling(max_new_tokens=4),
                               policy_version=lambda: 0)
    assert isinstance(eng, HFEngine)
    ro = eng.generate([[5, 6, 7]], 2)
    assert len(ro.response_ids) == 2 and eng.pop_metrics() == {}


def test_vllm_missing_is_one_line_naming_the_key(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError) as exc:
        load_config(QUICKSTART, ["grpo.rollout.engine=vllm"])
    msg = str(exc.value)
    assert "grpo.rollout.engine" in msg and "not installed" in msg and "\n" not in msg


def test_unknown_engine_and_key_are_config_errors():
    with pytest.raises(ConfigError, match="grpo.rollout.engine"):
        load_config(QUICKSTART, ["grpo.rollout.engine=sglang"])
    with pytest.raises(ConfigError, match="grpo.rollout.enigne"):
        load_config(QUICKSTART, ["grpo.rollout.enigne=vllm"])


def test_unsupported_combinations_name_the_key():
    m = build_tiny_model("llama", seed=0)
    cfg = RolloutConfig()
    cfg.engine = "vllm"  # set after construction: validate() would need vllm installed
    with pytest.raises(UserError, match="grpo.rollout.engine.*parallel.backend='fsdp'"):
        build_rollout_engine(cfg, m, byte_tokenizer(), Sampling(max_new_tokens=4), policy_version=lambda: 0,
                             backend="fsdp")
    cfg.tensor_parallel = 2  # megatron is supported with one engine per rank, not with rollout TP groups
    with pytest.raises(UserError, match="grpo.rollout.tensor_parallel.*megatron"):
        build_rollout_engine(cfg, m, byte_tokenizer(), Sampling(max_new_tokens=4), policy_version=lambda: 0,
                             backend="megatron")
    cfg.tensor_parallel = 1
    with pytest.raises(UserError, match="grpo.rollout.engine.*temperature"):
        build_rollout_engine(cfg, m, byte_tokenizer(), Sampling(max_new_tokens=4, temperature=0.7, top_p=0.9),
                             policy_version=lambda: 0)


def test_correction_validation():
    r = RolloutConfig()
    assert (r.correction, r.correction_cap, r.correction_low, r.correction_high) == ("none", 3.0, 0.5, 5.0)
    RolloutConfig(correction="sequence_mask", correction_cap=2.0).validate()
    RolloutConfig(correction="icepop", correction_low=0.0, correction_high=float("inf")).validate()
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="correction_cap"):
            RolloutConfig(correction_cap=bad).validate()
    for low, high in ((2.0, 2.0), (3.0, 2.0), (-0.1, 2.0), (float("nan"), 2.0)):
        with pytest.raises(ValueError, match="correction_low"):
            RolloutConfig(correction="icepop", correction_low=low, correction_high=high).validate()
    with pytest.raises(ConfigError, match="grpo.rollout.correction"):
        load_config(QUICKSTART, ["grpo.rollout.correction=truncate"])
    with pytest.raises(ConfigError, match="grpo.rollout.correction: token_truncate and grpo.rollout.correction_cap: 2"):
        load_config(QUICKSTART, ["grpo.rollout.tis_cap=2"])


def test_weight_buckets_respect_the_size():
    mb = 2**20
    named = [(f"t{i}", torch.zeros(n // 4)) for i, n in enumerate([mb // 2, mb // 2, mb // 4, 3 * mb, mb // 8])]
    buckets = list(weight_buckets(iter(named), 1))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


def test_logprob_gap_against_hand_values():
    assert logprob_gap([[-1.0, -2.0], [-0.5]], [[-1.1, -2.0], [-0.2]]) == pytest.approx(
        {"rollout_logprob_abs_diff": (0.1 + 0.0 + 0.3) / 3, "rollout_logprob_abs_diff_max": 0.3})
    assert logprob_gap([[]], [[]]) == {}


def test_policy_token_logprobs_match_the_decode_loop():
    """The trainer-side check equals the HF loop's own per-token log-probs (same model, fp32, temperature 0.8)."""
    m = build_tiny_model("llama", seed=1)
    gen = HFEngine(m, byte_tokenizer(), max_new_tokens=6, temperature=0.8, seed=3)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
    ro = gen.generate(prompts, 2)
    lp = policy_token_logprobs(m, ro.prompt_ids, ro.response_ids, temperature=0.8, batch_size=4)
    gap = logprob_gap(ro.logprobs, lp)
    assert gap["rollout_logprob_abs_diff_max"] < 1e-5, gap


def test_checkpoint_of_the_other_engine_is_refused():
    m = build_tiny_model("llama", seed=0)
    eng = build_rollout_engine(RolloutConfig(), m, byte_tokenizer(), Sampling(max_new_tokens=4),
                               policy_version=lambda: 0)
    with pytest.raises(UserError, match="grpo.rollout.engine.*another rollout engine"):
        eng.load_state_dict({"engine": "vllm", "calls": 3})
    eng.load_state_dict(eng.state_dict())
