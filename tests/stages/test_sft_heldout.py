"""The SFT stage's held-out loss (data.eval_files): logged at step 0 and after the last step through the trainer's
module, it equals the pipeline's scoring of the same models reloaded from disk (nova_rt.stages.pipeline.heldout_nll),
and its numbers are the per-token mean and per-document standard error of those documents."""

import numpy as np
import pytest
import torch

from nova_rt.config import load_config
from nova_rt.stages import get_stage
from nova_rt.stages.pipeline import heldout_nll
from nova_rt.telemetry import read_metrics
from tests.stages.test_pipeline import ROOT


def test_sft_eval_matches_reloaded_models(tmp_path):
    eval_file = str(ROOT / "data" / "sft" / "slice_text_eval.jsonl")  # enumerations: long and length-varied rows
    cfg = load_config(ROOT / "configs" / "tiny_sft.yaml", [
        f"run.dir={tmp_path}", "train.max_steps=2", "train.num_threads=1", "logging.tensorboard=false",
        "logging.plot=false", f"data.eval_files=[{eval_file}]", "checkpoint.every=0"])
    get_stage("sft")(cfg)
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    docs = heldout_nll(cfg, {"base": cfg.model.path, "final": str(tmp_path / "final")}, {"x": [eval_file]},
                       torch.device("cpu"))
    for row, name in zip(evals, ("base", "final")):
        d = np.asarray(docs[name]["x"])
        assert row["eval_docs"] == len(d) == 32 and row["eval_tokens"] == d[:, 1].sum()
        assert row["eval_loss"] == pytest.approx(d[:, 0].sum() / d[:, 1].sum(), rel=1e-5)
        per_doc = d[:, 0] / d[:, 1]
        assert row["eval_loss_se"] == pytest.approx(per_doc.std(ddof=1) / np.sqrt(len(d)), rel=1e-4)
    assert evals[1]["eval_loss"] != evals[0]["eval_loss"]
