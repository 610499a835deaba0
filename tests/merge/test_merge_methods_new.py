"""The merge methods added after the first five (breadcrumbs, breadcrumbs_ties, della, della_linear): each against
a plain float64 reference written here element by element (Python sorting and a Python splitmix64, no code shared
with nova_rt.merge.reference), with the edge cases (zero task vectors, densities 0 and 1, one model, equal
magnitudes, bf16 inputs, odd shapes), plus one `nova-rt merge` run per method through the streaming engine."""

from __future__ import annotations

import pytest
import torch

from nova_rt.merge import MergeConfigError, get_merge
from nova_rt.merge.cli import main as cli_main
from nova_rt.merge.methods import tensor_id
from nova_rt.merge.registry import TensorMerge
from tests.helpers import assert_close_verbose
from tests.merge.conftest import load_weights, write_yaml

MASK64 = (1 << 64) - 1
GTA_NEW = {  # name: (sparsification, TIES sign consensus, default normalize, default rescale)
    "breadcrumbs": ("outliers", False, False, False), "breadcrumbs_ties": ("outliers", True, False, False),
    "della": ("della", True, True, True), "della_linear": ("della", False, False, True)}


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _uniform24(seed: int, name: str, model: int, numel: int) -> list[int]:
    """The DARE counter RNG as its spec says: splitmix64(stream + e) >> 40, stream keyed by seed, tensor, model."""
    stream = _splitmix(_splitmix(_splitmix(seed) ^ tensor_id(name)) ^ model)
    return [_splitmix((stream + e) & MASK64) >> 40 for e in range(numel)]


def _ascending(values: list[float]) -> list[int]:
    """Positions in ascending |value| order, equal magnitudes in position order."""
    return sorted(range(len(values)), key=lambda i: (abs(values[i]), i))


def _outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    flat = delta.reshape(-1).tolist()
    n = len(flat)
    if density >= 1:
        return delta.clone()
    keep, drop_top = int(density * n), int(gamma * n)
    start = max(0, n - keep - drop_top)
    kept = set(_ascending(flat)[start:start + keep])
    return torch.tensor([v if i in kept else 0.0 for i, v in enumerate(flat)], dtype=torch.float64).reshape(
        delta.shape)


def _della(delta: torch.Tensor, density: float, epsilon: float, seed: int, name: str, model: int) -> torch.Tensor:
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta.reshape(1, -1, 1) if delta.dim() < 2 else delta.reshape(delta.shape[0], delta.shape[1], -1)
    u24 = _uniform24(seed, name, model, delta.numel())
    out = torch.zeros(rows.shape, dtype=torch.float64)
    length = rows.shape[1]
    for r in range(rows.shape[0]):
        for c in range(rows.shape[2]):
            column = rows[r, :, c].tolist()
            for rank, j in enumerate(_ascending(column)):
                spread = rank / (length - 1) if length > 1 else 0.5
                prob = (density - epsilon) + spread * 2 * epsilon
                flat_index = (r * length + j) * rows.shape[2] + c
                out[r, j, c] = column[j] if u24[flat_index] < prob * 2 ** 24 else 0.0
    return out.reshape(delta.shape)


def reference_gta(method: str, base: torch.Tensor, xs: list[torch.Tensor], model_params: list[dict],
                  params: dict, *, seed: int = 0, name: str = "t") -> torch.Tensor:
    """float64 merge as mergekit's generalized task arithmetic describes it for `method`."""
    sparsification, consensus, _, _ = GTA_NEW[method]
    b = base.double()
    deltas = []
    for i, (x, p) in enumerate(zip(xs, model_params)):
        delta = x.double() - b
        if sparsification == "outliers":
            kept = _outliers(delta, p["density"], p.get("gamma", 0.01))
        else:
            kept = _della(delta, p["density"], p.get("epsilon", 0.15), seed, name, i)
        if params["rescale"] and p["density"] < 1:
            before, after = delta.abs().sum().item(), kept.abs().sum().item()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        deltas.append(kept * p["weight"])
    weights = [p["weight"] for p in model_params]
    total = sum(deltas)
    if consensus:
        sign = torch.where(total >= 0, 1.0, -1.0).double()
        mixed = sum(torch.where(d.sign() == sign, d, 0.0) for d in deltas)
        divisor = sum((d.sign() == sign).double() * w for d, w in zip(deltas, weights))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = total
        divisor = 1.0 if abs(sum(weights)) < 1e-8 else sum(weights)
    if params["normalize"]:
        mixed = mixed / divisor
    return b + params["lambda"] * mixed


def _run(method: str, base, xs, model_params, params=None, *, seed=0, name="t", out_dtype=None, impl="auto"):
    m = get_merge(method)
    full = {k: spec.default for k, spec in m.global_params.items()} | (params or {})
    per_model = [{k: spec.default for k, spec in m.model_params.items() if k != "weight"}
                 | {k: v for k, v in p.items() if k in m.model_params} for p in model_params]
    merge = TensorMerge(name=name, base=base, tensors=xs, model_params=per_model, params=full,
                        out_dtype=out_dtype or base.dtype, impl=impl, seed=seed)
    return m(merge), full, per_model


def _models(shape, count, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base.to(dtype), [(base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
                            for _ in range(count)]


@pytest.mark.parametrize("method", list(GTA_NEW))
@pytest.mark.parametrize("shape", [(7, 13), (37,), (3, 5, 2), (1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.35, 0.8, 1.0])
def test_gta_variants_match_float64_reference(method, shape, density):
    base, xs = _models(shape, 3, seed=hash((method, shape, density)) % 1000)
    model_params = [{"weight": w, "density": density, "gamma": 0.1, "epsilon": 0.1} for w in (0.6, 1.1, -0.3)]
    got, params, per_model = _run(method, base, xs, model_params, {"lambda": 0.9}, seed=11, name="layer.w")
    want = reference_gta(method, base, xs, per_model, params, seed=11, name="layer.w")
    assert_close_verbose(got, want, rtol=1e-12, atol=1e-12, name=f"{method} {shape} density {density}")
    if density == 0:
        assert torch.equal(got, base)


@pytest.mark.parametrize("method", list(GTA_NEW))
def test_gta_variants_rescale_normalize_and_one_model(method):
    base, xs = _models((9, 11), 1, seed=5)
    for params in ({"rescale": True, "normalize": True}, {"rescale": False, "normalize": False}):
        model_params = [{"weight": 0.7, "density": 0.4, "gamma": 0.05, "epsilon": 0.2}]
        got, full, per_model = _run(method, base, xs, model_params, params, seed=3)
        want = reference_gta(method, base, xs, per_model, full, seed=3)
        assert_close_verbose(got, want, rtol=1e-12, atol=1e-12, name=f"{method} {params}")
        assert not torch.equal(got, base)


@pytest.mark.parametrize("method", list(GTA_NEW))
def test_gta_variants_zero_task_vectors_and_equal_magnitudes(method):
    base = torch.randn(6, 10, dtype=torch.float64)
    zero = [base.clone(), base.clone()]
    got, _, _ = _run(method, base, zero, [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
                     {"rescale": True})
    assert torch.equal(got, base)
    # every |delta| is 0.25 or 0.5 with mixed signs: which of the equal ones survive depends on the tie rule
    pattern = torch.tensor([0.25, -0.5, 0.5, -0.25] * 15, dtype=torch.float64).reshape(6, 10)
    xs = [base + pattern, base - pattern.flip(0)]
    model_params = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 0.5, "density": 0.3, "gamma": 0.2}]
    got, full, per_model = _run(method, base, xs, model_params, seed=9)
    want = reference_gta(method, base, xs, per_model, full, seed=9)
    assert_close_verbose(got, want, rtol=1e-12, atol=1e-12, name=f"{method} equal magnitudes")


@pytest.mark.parametrize("method", list(GTA_NEW))
def test_gta_variants_bf16_inputs(method):
    base, xs = _models((16, 24), 2, seed=21, dtype=torch.bfloat16)
    model_params = [{"weight": 0.8, "density": 0.6}, {"weight": 0.4, "density": 0.3}]
    got, full, per_model = _run(method, base, xs, model_params, seed=4)
    assert got.dtype == torch.bfloat16
    want = reference_gta(method, base, xs, per_model, full, seed=4)
    assert_close_verbose(got, want.to(torch.bfloat16), rtol=8e-3, atol=1e-3, name=f"{method} bf16")


def test_della_is_seeded_per_tensor_and_model():
    base, xs = _models((32, 32), 2, seed=1)
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    a = _run("della_linear", base, xs, params, seed=1, name="a")[0]
    assert torch.equal(a, _run("della_linear", base, xs, params, seed=1, name="a")[0])
    assert not torch.equal(a, _run("della_linear", base, xs, params, seed=2, name="a")[0])
    assert not torch.equal(a, _run("della_linear", base, xs, params, seed=1, name="b")[0])


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(200, 400, dtype=torch.float64)
    delta = torch.arange(400, dtype=torch.float64).repeat(200, 1) + 1
    got = _run("della_linear", base, [delta], [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}],
               {"rescale": False})[0]
    kept = (got != 0).double().mean(dim=0)
    assert kept[:40].mean() < 0.25 and kept[-40:].mean() > 0.75 and abs(kept.mean() - 0.5) < 0.02


def test_bad_gamma_epsilon_and_ext_are_config_errors():
    base, xs = _models((4, 4), 1, seed=2)
    with pytest.raises(MergeConfigError, match="density 0.9 -/\\+ epsilon 0.15 must stay inside"):
        _run("della", base, xs, [{"weight": 1.0, "density": 0.9}])
    with pytest.raises(MergeConfigError, match="gamma = 1.5 must be in"):
        _run("breadcrumbs", base, xs, [{"weight": 1.0, "density": 0.5, "gamma": 1.5}])
    with pytest.raises(MergeConfigError, match="no C\\+\\+ kernel"):
        _run("breadcrumbs_ties", base, xs, [{"weight": 1.0, "density": 0.5}], impl="ext")


ENGINE_MODELS = [("ft1", 0.6, 0.5), ("ft2", 0.9, 0.7), ("ft3", 0.3, 0.3)]


@pytest.mark.parametrize("method", list(GTA_NEW))
def test_nova_rt_merge_cli_streams_each_method(tiny_models, tmp_path, method):
    root = tiny_models["root"]
    extra = {"gamma": 0.05} if method.startswith("breadcrumbs") else {"epsilon": 0.1}
    cfg = {"merge_method": method, "base_model": "base", "dtype": "float64", "parameters": {"lambda": 0.9},
           "models": [{"model": m, "parameters": {"weight": w, "density": d, **extra}} for m, w, d in ENGINE_MODELS]}
    cfg_path = write_yaml(root / f"new_{method}.yaml", cfg)
    out = tmp_path / "out"
    assert cli_main([str(cfg_path), str(out), "--no-progress", "--random-seed", "5", "--max-shard-size",
                     "100KB"]) == 0
    merged = load_weights(out)
    inputs = {k: load_weights(tiny_models[k]) for k in ("base", "ft1", "ft2", "ft3")}
    m = get_merge(method)
    params = {k: spec.default for k, spec in m.global_params.items()} | {"lambda": 0.9}
    per_model = [{k: spec.default for k, spec in m.model_params.items()} | e["parameters"] for e in cfg["models"]]
    assert set(merged) == set(inputs["base"])
    for name, got in merged.items():
        want = reference_gta(method, inputs["base"][name], [inputs[k][name] for k, _, _ in ENGINE_MODELS],
                             per_model, params, seed=5, name=name)
        assert got.dtype == torch.float64
        assert_close_verbose(got, want, rtol=1e-12, atol=1e-12,
                             name=f"{method}:{name} (models seed {tiny_models['seed']})")
