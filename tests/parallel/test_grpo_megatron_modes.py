"""grpo.loss.mode on parallel.backend=megatron (TP=2, gloo, CPU shims) matches the HF backend step for step: gspo
(sequence-level: one ratio per response, the PyTorch path) and cispo (per token). Same setup as
test_grpo_megatron.py's first test, without its resume half: two rollout steps of 2 optimizer steps each
(ppo_epochs=2, so ratios differ from 1 and the clip / IS-weight cap acts), a sampled k3 KL in the token-level
reward; every logged metric and the final weights are compared."""

import subprocess
import sys

import pytest

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights
from tests.parallel.test_grpo_megatron import SKIP, _common

MODES = {"gspo": ["grpo.loss.mode=gspo", "grpo.loss.agg=seq-mean-token-mean", "grpo.loss.eps_low=0.003",
                  "grpo.loss.eps_high=0.004"],
         "cispo": ["grpo.loss.mode=cispo", "grpo.loss.eps_low=1.0", "grpo.loss.eps_high=0.05"]}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["gspo", pytest.param("cispo", marks=pytest.mark.slow)])
def test_megatron_grpo_mode_matches_hf_backend(tmp_path, mode):
    from nova_rt.models.tiny import save_tiny_model

    print(f"seed={SEED}")
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    hf_dir, mg_dir = tmp_path / "hf", tmp_path / "mg"
    common = lambda run_dir: _common(run_dir, model_dir, [*MODES[mode], "grpo.eval.every=0"])  # noqa: E731
    r = subprocess.run([sys.executable, "-m", "nova_rt.train", *common(hf_dir)], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), *common(mg_dir),
                        "--set", "parallel.backend=megatron", "--set", "parallel.tensor_parallel=2"],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    mh, mm = (read_metrics(d) for d in (hf_dir, mg_dir))
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [2, 4]
    for a, b in zip(mh, mm):
        assert set(a) - SKIP == set(b) - SKIP, set(a) ^ set(b)
        for k in sorted(set(a) - SKIP):
            assert abs(a[k] - b[k]) <= 1e-4 * max(abs(a[k]), 1e-2), (f"seed={SEED}", mode, a["step"], k, a[k], b[k])
    assert mm[1]["kl"] > 0 and mm[1]["grad_norm"] > 0
    assert any(m["clip_frac"] > 0 for m in mh), f"the {mode} clip never acted: {mh}"
    wh, wm = read_weights(hf_dir / "final"), read_weights(mg_dir / "final")
    assert wh.keys() <= wm.keys() | {"lm_head.weight"}
    for k in wh:
        rel = ((wh[k] - wm[k]).norm() / wh[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={SEED}", mode, k, rel)
