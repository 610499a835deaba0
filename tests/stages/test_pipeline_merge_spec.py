"""The pipeline's merge of its SFT slice models (nova_rt.stages.pipeline.merge_spec + the merge engine), on tiny
random models, against merges computed by hand from the input tensors (float64)."""

import pytest
import torch
from safetensors.torch import load_file

from nova_rt.merge import run_merge
from nova_rt.models.tiny import save_tiny_model
from nova_rt.stages.pipeline import merge_spec

TINY = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 48}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    base = save_tiny_model(d / "base", "llama", seed=0, **TINY)
    slices = [save_tiny_model(d / f"s{i}", "llama", seed=i + 1, **TINY) for i in range(3)]  # an odd count
    load = lambda p: {k: v.double() for k, v in load_file(str(p / "model.safetensors")).items()}  # noqa: E731
    return str(base), [str(s) for s in slices], load(base), [load(s) for s in slices]


@pytest.mark.parametrize("method, parameters", [
    ("linear", {}),
    ("task_arithmetic", {"weight": 1.0}),
    ("task_arithmetic", {"weight": 0.7, "lambda": 0.5}),
    ("task_arithmetic", {}),
])
def test_merge_matches_hand_computed(models, tmp_path, method, parameters):
    base, slices, theta0, thetas = models
    out = run_merge(merge_spec(method, parameters, base, slices), tmp_path / "out")
    merged = load_file(str(out / "model.safetensors"))
    n = len(slices)
    w = parameters.get("weight", 1.0 / n)
    lam = parameters.get("lambda", 1.0)
    for name, t0 in theta0.items():
        if method == "linear":
            want = sum(t[name] for t in thetas) / n  # weights 1/N each sum to 1
        else:
            want = t0 + lam * sum(w * (t[name] - t0) for t in thetas)
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-6, msg=name)


def test_model_stock_interpolates_toward_the_base(models, tmp_path):
    base, slices, theta0, thetas = models
    out = run_merge(merge_spec("model_stock", {}, base, slices), tmp_path / "out")
    merged = load_file(str(out / "model.safetensors"))
    n = len(slices)
    for name, t0 in theta0.items():
        if t0.dim() < 2:  # layer norms: identical ones everywhere (cosine undefined); checked in tests/merge
            continue
        taus = [(t[name] - t0).flatten() for t in thetas]
        cos = [torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=0)
               for i in range(n) for j in range(i + 1, n)]
        c = sum(cos) / len(cos)
        t = n * c / (1 + (n - 1) * c)
        want = t * sum(x[name] for x in thetas) / n + (1 - t) * t0
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-5, msg=name)


def test_spec_shape():
    spec = merge_spec("ties", {"density": 0.3, "normalize": False}, "/b", ["/x", "/y"])
    assert spec["base_model"] == "/b" and spec["parameters"] == {"normalize": False}
    assert [m["parameters"] for m in spec["models"]] == [{"density": 0.3, "weight": 0.5}] * 2
    assert "base_model" not in merge_spec("linear", {}, "/b", ["/x", "/y"])
    assert merge_spec("model_stock", {}, "/b", ["/x", "/y"])["models"][0]["parameters"] == {}


def test_any_n_model_method_merges_the_slices(models, tmp_path):
    """ram takes no per-model weight and karcher no base: the spec gives each only what it accepts."""
    from nova_rt.stages.pipeline import MERGE_METHODS

    assert {"ram", "ramplus_tl", "karcher", "della", "sce", "multislerp"} <= set(MERGE_METHODS)
    base, slices, theta0, thetas = models
    spec = merge_spec("ram", {"epsilon": 1e-3}, base, slices)
    assert spec["parameters"] == {"epsilon": 1e-3} and spec["models"][0]["parameters"] == {}
    merged = load_file(str(run_merge(spec, tmp_path / "ram") / "model.safetensors"))
    n = len(slices)
    for name, t0 in theta0.items():
        taus = torch.stack([t[name] - t0 for t in thetas])
        counted = taus.abs() > 1e-3
        count = counted.sum(dim=0)
        want = t0 + torch.where(counted, taus, 0.0).sum(dim=0) / count.clamp(min=1)
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-5, msg=name)
    karcher = merge_spec("karcher", {"max_iter": 3}, base, slices)
    assert "base_model" not in karcher and karcher["parameters"] == {"max_iter": 3} and n == 3
    assert run_merge(karcher, tmp_path / "karcher").is_dir()
