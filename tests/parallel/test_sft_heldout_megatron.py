"""The SFT stage's held-out loss (data.eval_files) on parallel.backend=megatron (gloo, CPU shims): eval_loss at step 0
and after the last step agrees with the HF backend's on the same model, data and seed (the tolerance of the loss
equivalence in test_sft_megatron.py), eval_docs / eval_tokens are equal, and every layout logs the same documents:
TP=2 (the rows on both TP ranks; with SP, rows padded to a multiple of TP), PP=2 (results from the last stage),
DP=2 and TP=2 x DP=2 (rows split over replicas, gathered). With CP=2 (`forward` rejects it) the eval is skipped."""

import subprocess
import sys

import pytest

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics
from tests.parallel.test_sft_megatron import _common, _torchrun

EVAL_FILE = ROOT / "data" / "sft" / "slice_text_eval.jsonl"  # 32 documents, length-varied


def _evals(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "eval_loss" in m]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """(tiny model dir, run dir of the HF backend's SFT run with data.eval_files), shared by the layouts."""
    from nova_rt.models.tiny import save_tiny_model

    print(f"tiny model seed {SEED} (NOVA_RT_TEST_SEED replays it)")
    tmp = tmp_path_factory.mktemp("sft_heldout")
    model_dir = save_tiny_model(tmp / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    hf_dir = tmp / "hf"
    subprocess.run([sys.executable, "-m", "nova_rt.train", *_common(hf_dir, model_dir),
                    "--set", f"data.eval_files=[{EVAL_FILE}]"], check=True, cwd=ROOT, env=clean_env(),
                   capture_output=True, timeout=600)
    return model_dir, hf_dir


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.tensor_parallel=2"]),
    (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.pipeline_parallel=2"]),
    (2, []),
    (4, ["parallel.tensor_parallel=2"]),
], ids=["tp2", "tp2_sp", "pp2", "dp2", "tp2_dp2"])
def test_megatron_sft_heldout_matches_hf_backend(tmp_path, hf_run, nproc, layout):
    model_dir, hf_dir = hf_run
    mg_dir = tmp_path / "mg"
    sets = ["parallel.backend=megatron", f"data.eval_files=[{EVAL_FILE}]", *layout]
    log = _torchrun([*_common(mg_dir, model_dir), *[a for o in sets for a in ("--set", o)]], nproc=nproc)
    assert "held-out loss is not evaluated" not in log
    eh, em = _evals(hf_dir), _evals(mg_dir)
    assert [e["step"] for e in eh] == [e["step"] for e in em] == [0, 2], (eh, em)
    for h, m in zip(eh, em):
        assert h["eval_docs"] == m["eval_docs"] == 32 and h["eval_tokens"] == m["eval_tokens"] > 0, (h, m)
        assert abs(h["eval_loss"] - m["eval_loss"]) <= 1e-4 * abs(h["eval_loss"]), (eh, em)
        assert m["eval_loss_se"] == pytest.approx(h["eval_loss_se"], rel=1e-3), (eh, em)
    assert em[1]["eval_loss"] != em[0]["eval_loss"]  # the second eval sees the trained weights
    lh, lm = [m["loss"] for m in read_metrics(hf_dir) if "loss" in m], [m["loss"] for m in read_metrics(mg_dir)
                                                                       if "loss" in m]
    assert len(lh) == len(lm) == 2 and all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(lh, lm)), (lh, lm)


@pytest.mark.distributed
def test_megatron_sft_heldout_skipped_under_context_parallel(tmp_path, hf_run):
    """`forward` rejects context parallelism: with CP=2 the run trains, warns and logs no eval metrics."""
    model_dir, _ = hf_run
    sets = ["parallel.backend=megatron", f"data.eval_files=[{EVAL_FILE}]", "parallel.context_parallel=2"]
    log = _torchrun([*_common(tmp_path, model_dir), *[a for o in sets for a in ("--set", o)]])
    assert "held-out loss is not evaluated on the megatron backend with this layout" in log
    assert not _evals(tmp_path) and len(read_metrics(tmp_path)) == 2
