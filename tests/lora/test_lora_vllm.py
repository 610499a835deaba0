"""LoRA policies on the vLLM rollout engine (nova_rt/rollout/vllm_engine.py): adapter-only weight sync, on CPU.

Needs vllm (`make test-vllm` runs this module in .venv-vllm); skipped with the reason where vllm does not import.
One engine (rank 4 -> vLLM max_lora_rank 8) serves the module; the policy is a peft model over a tiny Llama whose
B matrices are drawn nonzero, so the adapter changes every log-prob.

1. the first sync hands over the base and the adapter, later ones the adapter alone (rollout_sync_mb exact), each
   as a new LoRARequest whose directory lives under work_dir and replaces the previous one;
2. rollout_logprob_abs_diff <= 1e-3 against the adapted policy (as full sync), and large (> 0.05) when the engine
   samples without the adapter or with a stale one: the check can fail;
3. an adapter on a subset of the linears (q_proj, v_proj) matches as well;
4. configs/tiny_grpo.yaml with lora.rank 4 through the CLI: every step syncs the adapter alone after the first.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.rollout import require_vllm  # noqa: E402

require_vllm()

from nova_rt.models.lora import adapters_disabled, add_adapters  # noqa: E402
from nova_rt.models.tiny import build_tiny_model, byte_tokenizer  # noqa: E402
from nova_rt.rollout.engine import (  # noqa: E402
    RolloutConfig,
    Sampling,
    build_rollout_engine,
    logprob_gap,
    policy_token_logprobs,
)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = Path(__file__).resolve().parents[2]
TINY = dict(hidden=128, heads=2, kv_heads=1, layers=2, intermediate=256)  # head_dim 64: vLLM's CPU attention
MB = 2**20


class Policy:
    """A tiny Llama with rank-4 adapters (B drawn nonzero), AdamW on them and a version counter (trainer.step)."""

    def __init__(self, seed: int, target_modules: tuple[str, ...] = ()):
        lora = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, target_modules=list(target_modules))
        self.model = add_adapters(build_tiny_model("llama", seed=0, dtype=torch.float32, **TINY), lora,
                                  source="test", seed=seed)
        draw = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2, generator=draw)
        self.trained = [param for param in self.model.parameters() if param.requires_grad]
        self.opt = torch.optim.AdamW(self.trained, lr=2e-2)
        self.version = 0

    def adapter_bytes(self) -> int:
        return sum(param.numel() * param.element_size() for param in self.trained)

    def step(self, seed: int) -> None:
        ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(seed))
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.version += 1


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def policy():
    return Policy(1)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def engine(policy, work_dir):
    eng = build_rollout_engine(RolloutConfig(engine="vllm", logprob_check=-1), policy.model, byte_tokenizer(),
                               Sampling(max_new_tokens=12, temperature=1.0, seed=0),
                               policy_version=lambda: policy.version, work_dir=work_dir)
    yield eng
    eng.close()


def _gap_to(model, rollout, *, disabled: bool = False) -> float:
    """Mean |sampling log-prob - the peft `model`'s| over the rollout's tokens (adapters off with `disabled`)."""
    with adapters_disabled(model) if disabled else torch.no_grad():
        scored = policy_token_logprobs(model.get_base_model(), rollout.prompt_ids, rollout.response_ids,
                                       temperature=1.0, batch_size=16, pad_id=0)
    return logprob_gap(rollout.logprobs, scored)["rollout_logprob_abs_diff"]


def test_adapter_only_sync_matches_the_adapted_policy(engine, policy, work_dir):
    base = policy.model.get_base_model().state_dict()  # (a tied LM head: sent under both names, as full sync does)
    base_bytes = sum(t.numel() * t.element_size() for name, t in base.items() if "lora_" not in name)
    rollout = engine.generate(_prompts(4, 0), 2)
    metrics = engine.pop_metrics()
    assert metrics["rollout_sync_mb"] * MB == base_bytes + policy.adapter_bytes()  # first sync: base + adapter
    assert metrics["rollout_logprob_abs_diff"] <= 1e-3, metrics
    assert _gap_to(policy.model, rollout, disabled=True) > 0.05  # the adapter matters: without it the check fails
    first = Path(engine.lora_request.lora_path)
    assert first.parent.parent == work_dir and first.is_dir()
    for k in range(2):
        policy.step(k)
        rollout = engine.generate(_prompts(4, 10 + k), 2)
        metrics = engine.pop_metrics()
        assert metrics["rollout_sync_mb"] * MB == policy.adapter_bytes(), metrics  # the adapter alone
        assert metrics["rollout_logprob_abs_diff"] <= 1e-3, metrics
    assert engine.lora_request.lora_int_id == 3 and engine.llm.llm_engine.list_loras() == {3}
    assert not first.exists() and sorted(p.name for p in first.parent.iterdir()) == ["policy_3"]


def test_logprob_check_sees_a_missing_or_stale_adapter(engine, policy):
    synced = engine.lora_request
    engine.lora_request = None  # samples from the base weights alone
    try:
        engine.generate(_prompts(4, 20), 2)
    finally:
        engine.lora_request = synced
    assert engine.pop_metrics()["rollout_logprob_abs_diff"] > 0.05
    policy.step(99)
    engine.synced_version = policy.version  # pretend it synced: the engine keeps the previous adapter
    engine.generate(_prompts(4, 21), 2)
    assert engine.pop_metrics()["rollout_logprob_abs_diff"] > 0.05
    policy.version += 1
    engine.generate(_prompts(4, 22), 2)  # synced again
    assert engine.pop_metrics()["rollout_logprob_abs_diff"] <= 1e-3


def test_adapter_on_some_linears_matches(engine):
    subset = Policy(2, target_modules=("q_proj", "v_proj"))
    engine.model, engine.policy_version, engine.synced_version = subset.model, (lambda: subset.version), None
    engine.base_synced = False  # another model object (the same base weights)
    rollout = engine.generate(_prompts(4, 30), 2)
    assert engine.pop_metrics()["rollout_logprob_abs_diff"] <= 1e-3
    assert _gap_to(subset.model, rollout, disabled=True) > 0.05


def test_grpo_stage_with_lora_syncs_the_adapter_alone(tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "OMP_NUM_THREADS": "1"}
    overrides = ["grpo.rollout.engine=vllm", "lora.rank=4", "train.max_steps=3", "logging.tensorboard=false",
                 f"run.dir={run_dir}", "train.num_threads=1",
                 "model.tiny={hidden: 128, layers: 2, heads: 2, kv_heads: 1, intermediate: 256}"]
    done = subprocess.run([sys.executable, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / "tiny_grpo.yaml"),
                           *[x for o in overrides for x in ("--set", o)]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.stdout + done.stderr)[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    adapter = load_file(run_dir / "final" / "adapter_model.safetensors")  # fp32, as the engine's fp32 model
    adapter_mb = sum(t.numel() * t.element_size() for t in adapter.values()) / MB
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["rollout_sync_mb"] > 10 * adapter_mb  # step 1: the base too
    for r in rows:
        assert r["rollout_logprob_abs_diff"] <= 1e-3, r
    for r in rows[1:]:
        assert r["rollout_sync_s"] > 0 and r["rollout_sync_mb"] == pytest.approx(adapter_mb, rel=1e-9), r
    assert not list(run_dir.glob(".vllm_adapter_*"))  # the engine's adapter directory is gone with it


def test_max_lora_rank_is_the_next_rank_vllm_serves():
    from nova_rt.errors import UserError
    from nova_rt.rollout.vllm_engine import _max_lora_rank

    assert [_max_lora_rank(rank) for rank in (1, 4, 8, 9, 512)] == [1, 8, 8, 16, 512]
    with pytest.raises(UserError, match=r"lora.rank: 600 is above the largest LoRA rank vLLM serves \(512\)"):
        _max_lora_rank(600)
