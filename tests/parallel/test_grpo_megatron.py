"""The GRPO stage on parallel.backend=megatron (TP=2, gloo, CPU shims) matches the HF backend step for step.

Two rollout steps of 2 optimizer steps each (ppo_epochs=2: old log-probs from the backend's forward-only pass) with a
sampled k3 KL to a frozen reference backend in the token-level reward, eval before each rollout and at the end.
Rollouts are sampled by HF generate in both runs from the same seed; the megatron run's generation model gets its
weights gathered from the TP shards before each rollout, so the second rollout (and the evals) only match if that
sync is right: HF and megatron policies differ by float noise (~1e-7), far too little to flip a sampled token in a
few hundred draws. Compared: every logged metric (loss, grad norm, rewards, KL, entropy, clip fraction, response
lengths, eval accuracy) and the final weights. Then the megatron run dir is cut back to its checkpoint after the
first rollout and rerun: the resumed run (prompt sampler, rollout RNG, category weights, optimizer, shards) must end
bit-identical to the uninterrupted one. A fresh random tiny Llama each run (seed printed)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights


def _common(run_dir, model_dir):
    sets = [f"run.dir={run_dir}", f"model.path={model_dir}", "train.max_steps=4", "grpo.ppo_epochs=2",
            "grpo.ptx_coef=0", "grpo.kl=k3", "grpo.beta=0.05", "grpo.kl_placement=reward", "grpo.eval_every=1",
            "checkpoint.every=0", "logging.tensorboard=false", "train.num_threads=1", "run.seed=3",
            "grpo.group_size=4"]
    return ["--config", str(ROOT / "configs" / "tiny_grpo.yaml"), *[x for kv in sets for x in ("--set", kv)]]


@pytest.mark.distributed
def test_megatron_grpo_matches_hf_backend(tmp_path):
    from nova_rt.models.tiny import save_tiny_model

    print(f"seed={SEED}")
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    hf_dir, mg_dir = tmp_path / "hf", tmp_path / "mg"
    r = subprocess.run([sys.executable, "-m", "nova_rt.train", *_common(hf_dir, model_dir)], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    def megatron(run_dir):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                            str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), *_common(run_dir, model_dir),
                            "--set", "parallel.backend=megatron", "--set", "parallel.tensor_parallel=2", "--set",
                            "checkpoint.every=2"],
                           cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]

    megatron(mg_dir)
    mh, mm = (read_metrics(d) for d in (hf_dir, mg_dir))
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [2, 4]
    skip = {"step", "rollout_time_s", "train_time_s", "step_time_s"}
    for a, b in zip(mh, mm):
        assert set(a) - skip == set(b) - skip, set(a) ^ set(b)
        for k in sorted(set(a) - skip):
            assert abs(a[k] - b[k]) <= 1e-4 * max(abs(a[k]), 1e-2), (f"seed={SEED}", a["step"], k, a[k], b[k])
    assert mm[1]["kl"] > 0 and mm[1]["grad_norm"] > 0  # the second rollout trains (not all groups equal)
    eh, em = (json.loads((d / "eval_final.json").read_text()) for d in (hf_dir, mg_dir))
    assert eh == em
    wh, wm = read_weights(hf_dir / "final"), read_weights(mg_dir / "final")
    assert wh.keys() <= wm.keys() | {"lm_head.weight"}
    for k in wh:
        rel = ((wh[k] - wm[k]).norm() / wh[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={SEED}", k, rel)
    cut = tmp_path / "cut"
    shutil.copytree(mg_dir, cut)
    shutil.rmtree(cut / "final")
    (cut / "eval_final.json").unlink()
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000002"]
    megatron(cut)
    assert (cut / "metrics.jsonl").read_text().count("\n") == 2
    a, b = (read_metrics(d)[1] for d in (mg_dir, cut))
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert json.loads((cut / "eval_final.json").read_text()) == em
    wc = read_weights(cut / "final")
    for k in wm:
        assert torch.equal(wm[k], wc[k]), k
