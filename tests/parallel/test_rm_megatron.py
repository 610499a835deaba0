"""The reward-model stage on parallel.backend=megatron (gloo, CPU shims) gives the same per-step losses, reward
statistics, grad norms, eval metrics and final weights (body and score head) as the HF backend on the same pairs, at
TP=2, TP=2 with sequence parallelism and PP=2, and its final directory loads with AutoModelForSequenceClassification
and scores the eval pairs as the trained megatron model did. A fourth run resumes the TP=2 run from its step-1
checkpoint and must end bit-identical to it. One torchrun launch runs all four; a fresh random tiny Llama each run
(seed printed)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights

CONFIG = ROOT / "configs" / "tiny_rm.yaml"
LAYOUTS = {"tp2": ["parallel.tensor_parallel=2", "checkpoint.every=1"],
           "tp2_sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline_parallel=2"]}


def _overrides(run_dir, model_dir) -> list[str]:
    return [f"run.dir={run_dir}", f"model.path={model_dir}", "train.max_steps=2", "train.global_batch=2",
            "train.micro_batch=1", "train.eval_every=2", "logging.tensorboard=false", "logging.plot=false",
            "checkpoint.every=0", "optim.grad_clip=1.0", "train.num_threads=1", "rm.alpha=0.1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tiny model dir, HF-backend run dir, {layout: megatron run dir}): one HF run, one torchrun launch."""
    from nova_rt.models.tiny import save_tiny_model

    tmp = tmp_path_factory.mktemp("rm")
    print(f"seed={SEED}")
    model_dir = save_tiny_model(tmp / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    sets = [a for o in _overrides(tmp / "hf", model_dir) for a in ("--set", o)]
    r = subprocess.run([sys.executable, "-m", "nova_rt.train", "--config", str(CONFIG), *sets], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    mg = {name: tmp / name for name in [*LAYOUTS, "tp2_resumed"]}
    # tp2_resumed sees tp2's checkpoints, less the last step's (written before final), and resumes from step 1
    (mg["tp2"] / "checkpoints").mkdir(parents=True)
    mg["tp2_resumed"].mkdir()
    (mg["tp2_resumed"] / "checkpoints").symlink_to(mg["tp2"] / "checkpoints")
    layouts = {**LAYOUTS, "tp2_resumed": LAYOUTS["tp2"]}
    runs = [[*_overrides(mg[name], model_dir), "parallel.backend=megatron", *extra] for name, extra in layouts.items()]
    runs.insert(-1, {"remove": [str(mg["tp2"] / "checkpoints" / "step_00000002")]})
    spec = {"config": str(CONFIG), "runs": runs}
    (tmp / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(ROOT / "tests" / "parallel" / "rm_megatron_worker.py"), str(tmp / "spec.json")],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return model_dir, tmp / "hf", mg


def _eval_rewards(final_dir, model_dir, run_dir) -> tuple[float, float]:
    """Mean reward of the eval pairs' chosen and rejected sequences under the saved directory, loaded with
    AutoModelForSequenceClassification and run one unpadded sequence at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nova_rt.config import load_config
    from nova_rt.stages.rm import build_pair_data

    cfg = load_config(CONFIG, _overrides(run_dir, model_dir))
    pairs = build_pair_data(cfg, AutoTokenizer.from_pretrained(final_dir), cfg.data.eval_files)[0]
    model = AutoModelForSequenceClassification.from_pretrained(final_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        score = [[model(input_ids=torch.as_tensor(s.input_ids)[None]).logits[0, 0].item()
                  for s in (p.chosen, p.rejected)] for p in pairs]
    return sum(c for c, _ in score) / len(score), sum(r for _, r in score) / len(score)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_rm_matches_hf_backend(runs, layout):
    model_dir, hf_dir, mg_dirs = runs
    mg_dir = mg_dirs[layout]
    mh, mm = read_metrics(hf_dir), read_metrics(mg_dir)
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [0, 1, 2]  # eval at 0, train steps 1-2
    keys = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "pairs", "grad_norm", "eval_loss",
            "eval_reward_chosen", "eval_reward_rejected", "eval_margin", "eval_accuracy"]
    for a, b in zip(mh, mm):
        for k in keys:
            if k in a:  # rewards are O(0.1-1); fp32 noise of two implementations is ~1e-7 relative
                assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) + 1e-6, (f"seed={SEED}", layout, a["step"], k, a[k], b[k])
    assert mm[1]["loss"] != mm[2]["loss"]  # the model moved
    wh, wm = read_weights(hf_dir / "final"), read_weights(mg_dir / "final")
    assert wh.keys() == wm.keys() and "score.weight" in wh
    for k in wh:
        rel = ((wh[k] - wm[k]).norm() / wh[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={SEED}", layout, k, rel)
    ch, cm = (json.loads((d / "final" / "config.json").read_text()) for d in (hf_dir, mg_dir))
    for k in ("architectures", "id2label", "pad_token_id", "model_type", "use_cache"):
        assert ch.get(k) == cm.get(k), (k, ch.get(k), cm.get(k))
    chosen, rejected = _eval_rewards(mg_dir / "final", model_dir, mg_dir)
    for got, want in ((chosen, mm[2]["eval_reward_chosen"]), (rejected, mm[2]["eval_reward_rejected"])):
        assert abs(got - want) <= 1e-5 * abs(want) + 1e-6, (f"seed={SEED}", layout, got, want)


@pytest.mark.distributed
def test_megatron_rm_resume_is_exact(runs):
    _, _, mg_dirs = runs
    full, resumed = read_metrics(mg_dirs["tp2"]), read_metrics(mg_dirs["tp2_resumed"])
    assert [m["step"] for m in resumed] == [2]  # started at step 1: no step-0 eval, no step 1
    for k in ("loss", "grad_norm", "reward_chosen", "margin", "eval_loss", "eval_reward_chosen"):
        assert resumed[0][k] == full[2][k], (f"seed={SEED}", k, resumed[0][k], full[2][k])
    wf, wr = read_weights(mg_dirs["tp2"] / "final"), read_weights(mg_dirs["tp2_resumed"] / "final")
    assert wf.keys() == wr.keys()
    for k in wf:
        assert torch.equal(wf[k], wr[k]), (f"seed={SEED}", k)
