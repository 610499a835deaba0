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


def test_eval_max_rows_scores_the_first_documents_and_pairs(tmp_path):
    """data.eval_max_rows: the SFT eval, the pipeline's held-out scoring and the RM/DPO eval pairs use the first N
    usable rows of eval_files, the same documents as the full set's first N."""
    from nova_rt.stages.common import load_policy
    from nova_rt.stages.rm import build_pair_data

    eval_file = str(ROOT / "data" / "sft" / "slice_text_eval.jsonl")
    sets = [f"run.dir={tmp_path}", "train.max_steps=1", "train.num_threads=1", "logging.tensorboard=false",
            "logging.plot=false", f"data.eval_files=[{eval_file}]", "checkpoint.every=0"]
    cfg = load_config(ROOT / "configs" / "tiny_sft.yaml", sets + ["data.eval_max_rows=5"])
    get_stage("sft")(cfg)
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r]
    assert [r["eval_docs"] for r in evals] == [5, 5]
    head = tmp_path / "head5.jsonl"  # the file's first 5 rows, scored in full
    head.write_text("".join(open(eval_file).readlines()[:5]))
    full_cfg = load_config(ROOT / "configs" / "tiny_sft.yaml", sets)
    five = heldout_nll(cfg, {"base": cfg.model.path}, {"x": [eval_file]}, torch.device("cpu"))["base"]["x"]
    expect = heldout_nll(full_cfg, {"base": cfg.model.path}, {"x": [str(head)]}, torch.device("cpu"))["base"]["x"]
    assert np.allclose(sorted(map(tuple, five)), sorted(map(tuple, expect)), rtol=1e-6, atol=0)
    d = np.asarray(five)
    assert evals[0]["eval_loss"] == pytest.approx(d[:, 0].sum() / d[:, 1].sum(), rel=1e-5)

    pair_file = str(ROOT / "data" / "preference" / "helpful_pairs_eval.jsonl")
    rm_cfg = load_config(ROOT / "configs" / "tiny_rm.yaml", [f"run.dir={tmp_path}/rm"])
    tok = load_policy(rm_cfg)[1]
    pairs3 = build_pair_data(rm_cfg, tok, [pair_file], max_rows=3)[0]
    pairs = build_pair_data(rm_cfg, tok, [pair_file])[0]
    ids = [(p.chosen.source, p.chosen.input_ids.tolist(), p.rejected.input_ids.tolist()) for p in pairs]
    assert len(pairs3) == 3 < len(pairs)
    assert [(p.chosen.source, p.chosen.input_ids.tolist(), p.rejected.input_ids.tolist()) for p in pairs3] == ids[:3]


@pytest.mark.parametrize("key, value", [("data.eval_max_rows", "-1"), ("pipeline.pas_augment_max_new_tokens", "0")])
def test_eval_and_augment_limits_are_checked(key, value):
    from nova_rt.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=key.split(".")[-1]):
        load_config(ROOT / "configs" / "tiny_pipeline.yaml", [f"{key}={value}"])
