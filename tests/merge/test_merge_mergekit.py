"""`nova-rt merge` against mergekit itself (the installed mergekit, run in-process on the same YAML): linear,
task_arithmetic, ties and model_stock agree tensor by tensor up to fp32 rounding. DARE is excluded (mergekit draws
masks from torch's global RNG and rescales by L1 norm) and so is SLERP's per-tensor chunking (same math, covered
by the hand-computed tests)."""

from __future__ import annotations

import os

import pytest
import torch

from nova_rt.merge import run_merge
from tests.helpers import assert_close_verbose
from tests.merge.conftest import load_weights, write_yaml

mergekit = pytest.importorskip("mergekit", reason="mergekit is a bench extra (pip install nova_rt[bench])")

CONFIGS = {
    "linear": {"merge_method": "linear", "dtype": "float32",
               "models": [{"model": "ft1", "parameters": {"weight": 0.5}},
                          {"model": "ft2", "parameters": {"weight": 1.0}},
                          {"model": "ft3", "parameters": {"weight": 0.25}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
                        "parameters": {"lambda": 0.8},
                        "models": [{"model": "ft1", "parameters": {"weight": 0.7}},
                                   {"model": "ft2", "parameters": {"weight": 0.4}}]},
    "ties": {"merge_method": "ties", "base_model": "base", "dtype": "float32",
             "models": [{"model": "base"}, {"model": "ft1", "parameters": {"weight": 1.0, "density": 0.4}},
                        {"model": "ft2", "parameters": {"weight": 0.6, "density": 0.7}},
                        {"model": "ft3", "parameters": {"weight": 0.3, "density": 0.2}}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "dtype": "float32",
                    "models": [{"model": "ft1"}, {"model": "ft2"}, {"model": "ft3"}]},
}


def _mergekit(cfg_path, out_dir):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run_merge

    raw = yaml.safe_load(cfg_path.read_text())
    cwd = os.getcwd()
    os.chdir(cfg_path.parent)  # mergekit resolves relative model paths against the CWD
    try:
        mk_run_merge(MergeConfiguration.model_validate(raw), str(out_dir),
                     MergeOptions(copy_tokenizer=False, write_model_card=False, allow_crimes=True))
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_matches_mergekit(tiny_models, tmp_path, method, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg_path = write_yaml(tiny_models["root"] / f"mk_{method}.yaml", CONFIGS[method])
    ours = load_weights(run_merge(cfg_path, tmp_path / "nova", progress=False))
    _mergekit(cfg_path, tmp_path / "mergekit")
    theirs = load_weights(tmp_path / "mergekit")
    assert set(ours) == set(theirs), f"tensor names differ: {set(ours) ^ set(theirs)}"
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype == torch.float32, name
        assert_close_verbose(ours[name], t, rtol=1e-5, atol=1e-6,
                             name=f"{method}:{name} (models seed {tiny_models['seed']})")
