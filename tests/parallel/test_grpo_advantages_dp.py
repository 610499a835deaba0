"""grpo.loss.advantage with two data-parallel ranks on both backends: HF DDP (torchrun, 2 ranks) and megatron DP=2
(TP=1, gloo, CPU shims) run the same GRPO steps with REINFORCE++-baseline (whitening over the step's tokens on both
ranks), and agree metric for metric (loss, grad norm, rewards, zero_adv_frac) and in the final weights.
Each rank samples its own half of the prompts, so the whitening statistics only agree if both backends reduce them
over the same data-parallel group; tests/stages/test_grpo_advantages.py proves the estimators global over two gloo
ranks against the one-process result."""

import subprocess
import sys

import pytest

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights


def _args(run_dir, model_dir, estimator):
    sets = [f"run.dir={run_dir}", f"model.path={model_dir}", "train.max_steps=2", "grpo.ptx.coef=0",
            "grpo.loss.beta=0", "grpo.eval.every=0", "checkpoint.every=0", "logging.tensorboard=false",
            "train.num_threads=1", "run.seed=5", "grpo.sampling.group_size=3", "grpo.sampling.prompts_per_step=4",
            "grpo.micro_prompts=0", f"grpo.loss.advantage={estimator}"]
    return ["--config", str(ROOT / "configs" / "tiny_grpo.yaml"), *[x for kv in sets for x in ("--set", kv)]]


def _torchrun(entry: list[str], args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *entry,
                        *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.distributed
@pytest.mark.parametrize("estimator", ["reinforce_pp_baseline"])
def test_two_dp_ranks_hf_ddp_equals_megatron_dp(tmp_path, estimator):
    from nova_rt.models.tiny import save_tiny_model

    print(f"seed={SEED}")
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    hf_dir, mg_dir = tmp_path / "hf", tmp_path / "mg"
    _torchrun(["-m", "nova_rt.train"], _args(hf_dir, model_dir, estimator))
    _torchrun([str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py")],
              [*_args(mg_dir, model_dir, estimator), "--set", "parallel.backend=megatron"])
    mh, mm = read_metrics(hf_dir), read_metrics(mg_dir)
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [1, 2]
    for a, b in zip(mh, mm):
        for key in ("loss", "grad_norm", "reward_mean", "reward_std", "zero_adv_frac", "entropy", "response_len"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(abs(a[key]), 1e-2), (f"seed={SEED}", a["step"], key, a[key],
                                                                            b[key])
    assert any(m["grad_norm"] > 0 for m in mh)
    wh, wm = read_weights(hf_dir / "final"), read_weights(mg_dir / "final")
    for key in wh:
        rel = ((wh[key] - wm[key]).norm() / wh[key].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={SEED}", key, rel)
