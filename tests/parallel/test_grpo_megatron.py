"""The GRPO stage on parallel.backend=megatron (TP=2, gloo, CPU shims) matches the HF backend step for step.

Two rollout steps of 2 optimizer steps each (ppo_epochs=2: old log-probs from the backend's forward-only pass) with a
sampled k3 KL to a frozen reference backend in the token-level reward, eval before each rollout and at the end.
Rollouts are sampled by HF generate in both runs from the same seed; the megatron run's generation model gets its
weights gathered from the TP shards before each rollout, so the second rollout (and the evals) only match if that
sync is right: HF and megatron policies differ by float noise (~1e-7), far too little to flip a sampled token in a
few hundred draws. Compared: every logged metric (loss, grad norm, rewards, KL, entropy, clip fraction, response
lengths, eval accuracy) and the final weights. Then the megatron run dir is cut back to its checkpoint after the
first rollout and rerun: the resumed run (prompt sampler, rollout RNG, category weights, optimizer, shards) must end
bit-identical to the uninterrupted one. A fresh random tiny Llama each run (seed printed).

Then the report's exact top-k KL and the PTX term (KL to the reference on SFT rows, gamma = 0.1; the reference a
second random model), which on megatron run over vocab-parallel logits (nova_rt.parallel.vocab_parallel): the KL in
the token-level reward with top-k = 500 capped at the vocabulary (320 ids, more than a TP rank's 160: the exact KL)
and old log-probs at the reference's ids (ppo_epochs=2), and the KL in the loss with top-k = 100 (fewer than a rank's
shard) under TP=2 with sequence parallelism and under PP=2; sampling temperature 0.9 (the PTX rows use 1); a warmup
+ cosine lr schedule, so the logged lr is checked step by step too."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights


def _common(run_dir, model_dir, extra=()):
    sets = [f"run.dir={run_dir}", f"model.path={model_dir}", "train.max_steps=4", "grpo.ppo_epochs=2",
            "grpo.ptx.coef=0", "grpo.loss.kl=k3", "grpo.loss.beta=0.05", "grpo.loss.kl_placement=reward",
            "grpo.eval.every=1",
            "checkpoint.every=0", "logging.tensorboard=false", "train.num_threads=1", "run.seed=3",
            "grpo.sampling.group_size=4", *extra]
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
    shutil.rmtree(cut / "checkpoints" / "step_00000004")  # the last step's, written before final
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000002"]
    megatron(cut)
    assert (cut / "metrics.jsonl").read_text().count("\n") == 2
    a, b = (read_metrics(d)[1] for d in (mg_dir, cut))
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert json.loads((cut / "eval_final.json").read_text()) == em
    wc = read_weights(cut / "final")
    for k in wm:
        assert torch.equal(wm[k], wc[k]), k


SKIP = {"step", "rollout_time_s", "train_time_s", "step_time_s"}
# RL log-probs at temperature 0.9, PTX ones at 1 (as the HF stage does)
_TOPK = ["grpo.loss.kl=topk", "grpo.ptx.coef=0.1", "grpo.sampling.temperature=0.9", "grpo.eval.every=0",
         "optim.scheduler=cosine", "optim.warmup_steps=2"]
TOPK = {"reward": [*_TOPK, "grpo.loss.kl_placement=reward"],
        "loss": [*_TOPK, "grpo.loss.kl_placement=loss", "grpo.loss.topk=100"]}
LAYOUTS = {"tp2": ["parallel.tensor_parallel=2"],
           "tp2_sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline_parallel=2"]}


@pytest.fixture(scope="module")
def topk_hf_runs(tmp_path_factory):
    """{placement: (tiny model dir, extra --set values, HF-backend run dir)}, each HF run made on first use.

    The reference is a second random model, not the initial policy: with pi_theta = pi_ref the KL's gradient is 0
    up to rounding, and Adam turns rounding noise on parameters only the KL reaches (embedding rows of tokens only
    the PTX rows contain) into lr-sized steps of either sign, which no two implementations reproduce."""
    from nova_rt.models.tiny import save_tiny_model

    tmp = tmp_path_factory.mktemp("grpo_topk")
    tiny = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    model_dir = save_tiny_model(tmp / "tiny", "llama", seed=SEED, **tiny)
    ref_dir = save_tiny_model(tmp / "ref", "llama", seed=SEED + 1, **tiny)
    runs = {}

    def get(placement):
        extra = [*TOPK[placement], f"grpo.ref_model={ref_dir}"]
        if placement not in runs:
            run_dir = tmp / f"hf_{placement}"
            r = subprocess.run([sys.executable, "-m", "nova_rt.train", *_common(run_dir, model_dir, extra)],
                               cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-4000:]
            runs[placement] = run_dir
        return model_dir, extra, runs[placement]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize("placement, layout", [("reward", "tp2"), ("loss", "tp2_sp"),
                                               pytest.param("loss", "pp2", marks=pytest.mark.slow)])
def test_megatron_grpo_topk_kl_and_ptx_match_hf_backend(tmp_path, topk_hf_runs, placement, layout):
    print(f"seed={SEED}")
    model_dir, extra, hf_dir = topk_hf_runs(placement)
    mg_dir = tmp_path / "mg"
    sets = [*extra, "parallel.backend=megatron", *LAYOUTS[layout]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), *_common(mg_dir, model_dir, sets)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    mh, mm = read_metrics(hf_dir), read_metrics(mg_dir)
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [2, 4]
    for a, b in zip(mh, mm):
        assert set(a) - SKIP == set(b) - SKIP, set(a) ^ set(b)
        for k in sorted(set(a) - SKIP):
            assert abs(a[k] - b[k]) <= 1e-4 * max(abs(a[k]), 1e-2), (f"seed={SEED}", a["step"], k, a[k], b[k])
    # the lr applied by optimizer steps 2 and 4 (warmup 0.5, 1.0 of 1e-3; then cosine over 2 steps: 1.0, 0.55)
    assert [m["lr"] for m in mh] == [m["lr"] for m in mm] == pytest.approx([1e-3, 5.5e-4], rel=1e-12)
    assert mm[1]["kl"] > 0 and mm[1]["ptx_kl"] > 0 and mm[1]["grad_norm"] > 0
    wh, wm = read_weights(hf_dir / "final"), read_weights(mg_dir / "final")
    assert wh.keys() <= wm.keys() | {"lm_head.weight"}
    for k in wh:
        rel = ((wh[k] - wm[k]).norm() / wh[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={SEED}", k, rel)
