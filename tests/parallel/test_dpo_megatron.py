"""The DPO stage on parallel.backend=megatron (gloo, CPU shims) gives the same per-step losses, DPO statistics, eval
metrics and final weights as the HF backend on the same pairs: the stage loss (nova_rt.losses.preference.DPOLoss)
over per-token log-probs from the vocab-parallel cross entropy, reference log-probs from the backend's forward-only
pass, and sum-over-DP gradients of a globally normalised loss. A fresh random tiny Llama each run (seed printed)."""

import subprocess
import sys

import pytest

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights


def _common(run_dir, model_dir):
    return ["--config", str(ROOT / "configs" / "tiny_dpo.yaml"), "--set", f"run.dir={run_dir}",
            "--set", f"model.path={model_dir}", "--set", "train.max_steps=2", "--set", "train.global_batch=2",
            "--set", "train.micro_batch=1", "--set", "train.eval_every=2", "--set", "logging.tensorboard=false",
            "--set", "logging.plot=false", "--set", "checkpoint.every=0", "--set", "optim.grad_clip=1.0",
            "--set", "train.num_threads=1", "--set", "dpo.beta=0.5"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """(tiny model dir, HF-backend run dir): the reference both layouts are compared with."""
    from nova_rt.models.tiny import save_tiny_model

    tmp = tmp_path_factory.mktemp("dpo")
    print(f"seed={SEED}")
    model_dir = save_tiny_model(tmp / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    r = subprocess.run([sys.executable, "-m", "nova_rt.train", *_common(tmp / "hf", model_dir)], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return model_dir, tmp / "hf"


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2_online"])
def test_megatron_dpo_matches_hf_backend(tmp_path, hf_run, layout):
    """tp2: cached reference log-probs from the policy before training; pp2_online: a frozen second backend run on
    every step's micro-batches (same initial weights, so the same numbers as the HF run's cached reference)."""
    model_dir, hf_dir = hf_run
    mg_dir = tmp_path / "mg"
    parallel = {"tp2": ["--set", "parallel.tensor_parallel=2"],
                "pp2_online": ["--set", "parallel.pipeline_parallel=2", "--set", "dpo.reference_logprobs=online"]}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), *_common(mg_dir, model_dir),
                        "--set", "parallel.backend=megatron", *parallel[layout]],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    mh, mm = read_metrics(hf_dir), read_metrics(mg_dir)
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [0, 1, 2]  # eval at 0, train steps 1-2
    keys = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected",
            "pairs", "grad_norm", "eval_loss", "eval_margin", "eval_accuracy"]
    # Rewards and margins are beta x differences of sequence log-prob sums of a few hundred nats (cancellation), so
    # their float noise scales with beta x |log-prob sums|, not with their own size: per-token fp32 log-probs from two
    # implementations differ by ~1e-7 relative, summed over a sequence. Floor: 2e-7 x beta x (|chosen| + |rejected|)
    # (~6e-5 here; seen: 3.3e-6 on eval_margin), far below the size of the stats (1e-2).
    floor = 2e-7 * 0.5 * (abs(mh[1]["logps_chosen"]) + abs(mh[1]["logps_rejected"]))
    for a, b in zip(mh, mm):
        for k in keys:
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) + floor, (f"seed={SEED}", a["step"], k, a[k], b[k])
    assert mm[1]["loss"] != mm[2]["loss"]  # the policy moved
    wh, wm = read_weights(hf_dir / "final"), read_weights(mg_dir / "final")
    assert wh.keys() <= wm.keys() | {"lm_head.weight"}
    for k in wh:
        rel = ((wh[k] - wm[k]).norm() / wh[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={SEED}", k, rel)
