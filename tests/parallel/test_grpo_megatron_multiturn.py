"""Multi-turn episodes (grpo.env guess_number) on parallel.backend=megatron (TP=2, gloo, CPU shims) match the HF
backend: two rollout steps of G=2 episodes per row (up to 3 turns, feedback turns in between), a k3 KL in the loss,
greedy-episode eval before each step and at the end. The episodes are played by the HF decode loop (KV reuse on) on
the generation model the megatron run gathers from its TP shards before each rollout, so the second step's episodes
and the evals match only if that sync is right; the loss runs on sampled tokens only through megatron's micro-batches
(environment tokens are context, no shared-prefix layout there). Compared: every logged metric but timings, the
final eval and the final weights (1e-4 relative). A fresh random tiny Llama each run (seed printed)."""

import json
import subprocess
import sys

import pytest

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights
from tests.stages.test_grpo_multiturn import _config

SKIP = {"step", "rollout_time_s", "train_time_s", "step_time_s", "env_time_s"}


@pytest.mark.distributed
def test_megatron_grpo_episodes_match_hf_backend(tmp_path):
    from nova_rt.models.tiny import save_tiny_model

    print(f"seed={SEED}")
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    config = _config(tmp_path, {"type": "guess_number", "params": {"low": 1, "high": 16}}, eval={"every": 1})
    sets = [f"model.path={model_dir}", "run.seed=3", "train.max_steps=2"]

    def train(run_dir, launcher, *extra):
        cmd = [*launcher, "--config", str(config), *[x for kv in (f"run.dir={run_dir}", *sets, *extra)
                                                     for x in ("--set", kv)]]
        r = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]

    hf_dir, mg_dir = tmp_path / "hf", tmp_path / "mg"
    train(hf_dir, [sys.executable, "-m", "nova_rt.train"])
    train(mg_dir, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                   str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py")],
          "parallel.backend=megatron", "parallel.tensor_parallel=2")
    mh, mm = read_metrics(hf_dir), read_metrics(mg_dir)
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [1, 2]
    for a, b in zip(mh, mm):
        assert set(a) - SKIP == set(b) - SKIP, set(a) ^ set(b)
        for key in sorted(set(a) - SKIP):
            assert abs(a[key] - b[key]) <= 1e-4 * max(abs(a[key]), 1e-2), (f"seed={SEED}", a["step"], key, a[key],
                                                                            b[key])
    assert any(m["turns_mean"] > 1.0 for m in mm) and mm[1]["grad_norm"] > 0, mm
    eval_hf, eval_mg = (json.loads((d / "eval_final.json").read_text()) for d in (hf_dir, mg_dir))
    assert eval_hf == eval_mg
    weights_hf, weights_mg = read_weights(hf_dir / "final"), read_weights(mg_dir / "final")
    for key in weights_hf:
        rel = ((weights_hf[key] - weights_mg[key]).norm() / weights_hf[key].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={SEED}", key, rel)
