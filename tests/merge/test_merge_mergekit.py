"""`nova-rt merge` against mergekit itself (the installed mergekit, run in-process on the same YAML): linear,
task_arithmetic, ties, model_stock, breadcrumbs(_ties), nearswap, nuslerp, multislerp, sce, karcher, arcee_fusion
(tensors under mergekit's 1M-element sampling size), ram and ramplus_tl agree tensor by tensor up to fp32 rounding.
DARE is excluded (mergekit draws masks from torch's global RNG and rescales by L1 norm) and so is SLERP's per-tensor
chunking (same math, covered by the hand-computed tests); DELLA is compared per tensor with mergekit's
torch.bernoulli replaced by our draws."""

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
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "dtype": "float32",
                    "parameters": {"lambda": 0.9, "rescale": True},
                    "models": [{"model": "ft1", "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.05}},
                               {"model": "ft2", "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.1}},
                               {"model": "ft3", "parameters": {"weight": 0.3, "density": 0.3}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base", "dtype": "float32",
                         "parameters": {"normalize": True},
                         "models": [{"model": "ft1", "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
                                    {"model": "ft2", "parameters": {"weight": 0.6, "density": 0.4, "gamma": 0.2}},
                                    {"model": "ft3", "parameters": {"weight": 0.3, "density": 0.9}}]},
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "dtype": "float32", "parameters": {"t": 0.02},
                 "models": [{"model": "base"}, {"model": "ft1"}]},
    "nuslerp": {"merge_method": "nuslerp", "base_model": "base", "dtype": "float32",
                "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                "models": [{"model": "ft1", "parameters": {"weight": 0.3}},
                           {"model": "ft2", "parameters": {"weight": 0.9}}]},
    "nuslerp_no_base": {"merge_method": "nuslerp", "dtype": "float32",
                        "models": [{"model": "ft1", "parameters": {"weight": 1.0}},
                                   {"model": "ft2", "parameters": {"weight": 2.0}}]},
    "multislerp": {"merge_method": "multislerp", "base_model": "base", "dtype": "float32",
                   "models": [{"model": "ft1", "parameters": {"weight": 0.5}},
                              {"model": "ft2", "parameters": {"weight": 1.0}},
                              {"model": "ft3", "parameters": {"weight": 0.25}}]},
    "sce": {"merge_method": "sce", "base_model": "base", "dtype": "float32", "parameters": {"select_topk": 0.4},
            "models": [{"model": "ft1"}, {"model": "ft2"}, {"model": "ft3"}]},
    "karcher": {"merge_method": "karcher", "dtype": "float32",
                "models": [{"model": "ft1"}, {"model": "ft2"}, {"model": "ft3"}]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "dtype": "float32",
                     "models": [{"model": "base"}, {"model": "ft1"}]},
    # RL-style agents (conftest.sparse_agents): task vectors on 40% of the elements, overlapping at random
    "ram": {"merge_method": "ram", "base_model": "base", "dtype": "float32",
            "models": [{"model": "agent1"}, {"model": "agent2"}, {"model": "agent3"}]},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base", "dtype": "float32",
                   "parameters": {"r": 0.4, "alpha": 0.3, "epsilon": 1e-4},
                   "models": [{"model": "agent1"}, {"model": "agent2"}, {"model": "agent3"}]},
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
def test_matches_mergekit(tiny_models, sparse_agents, tmp_path, method, monkeypatch):
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


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_mergekit_given_the_same_draws(method, monkeypatch):
    """mergekit draws DELLA's masks with torch.bernoulli (global RNG): here its bernoulli checks that mergekit's keep
    probabilities equal ours and returns our counter-RNG draws, so everything else (ranks, L1 rescale, consensus,
    normalisation, lambda) is compared exactly as computed."""
    from mergekit.merge_methods.api import merge_tensors

    from nova_rt.merge import get_merge
    from nova_rt.merge.methods import tensor_id
    from nova_rt.merge.reference import dare_uniform24, della_keep_prob
    from nova_rt.merge.registry import TensorMerge

    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, 40, generator=g)
    xs = [base + 0.05 * torch.randn(24, 40, generator=g) for _ in range(3)]
    weights, densities, epsilons = [1.0, 0.6, 0.3], [0.5, 0.7, 0.3], [0.1, 0.2, 0.15]
    calls = []
    real_bernoulli = torch.bernoulli

    def bernoulli(probs, *args, **kwargs):
        i = len(calls)
        calls.append(i)
        ours = della_keep_prob(xs[i] - base, densities[i], epsilons[i]).reshape(probs.shape)
        assert_close_verbose(probs, ours, rtol=0, atol=1e-6, name=f"keep probabilities of model {i}")
        return (dare_uniform24(probs.shape, 7, tensor_id("w"), i) < ours * 16777216.0).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    per_model = {"weight": dict(enumerate(weights, 1)), "density": dict(enumerate(densities, 1)),
                 "epsilon": dict(enumerate(epsilons, 1))}
    theirs = merge_tensors([base, *xs], method, parameters={**per_model, "lambda": 0.8}, base_index=0, name="w")
    monkeypatch.setattr(torch, "bernoulli", real_bernoulli)
    assert calls == [0, 1, 2]
    m = get_merge(method)
    params = {k: spec.default for k, spec in m.global_params.items()} | {"lambda": 0.8}
    model_params = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)]
    ours = m(TensorMerge(name="w", base=base, tensors=xs, model_params=model_params, params=params,
                         out_dtype=torch.float32, seed=7))
    assert_close_verbose(ours, theirs, rtol=1e-5, atol=1e-6, name=method)
