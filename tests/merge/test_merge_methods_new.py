"""The merge methods added after the first five (breadcrumbs, breadcrumbs_ties, della, della_linear): each against
a plain float64 reference written here element by element (Python sorting and a Python splitmix64, no code shared
with nova_rt.merge.reference), with the edge cases (zero task vectors, densities 0 and 1, one model, equal
magnitudes, bf16 inputs, odd shapes), plus one `nova-rt merge` run per method through the streaming engine."""

from __future__ import annotations

import math

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


# ---- nearswap, nuslerp, multislerp, sce, karcher: float64 references written from the method descriptions ----


def ref_nearswap(base, x, t):
    a, b = base.double(), x.double()
    out = [bv * min(1.0, t / max(abs(av - bv), 1e-6)) + av * (1 - min(1.0, t / max(abs(av - bv), 1e-6)))
           for av, bv in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())]
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


def _slerp_vectors(t: float, v0: list[float], v1: list[float]) -> list[float]:
    n0 = max(math.sqrt(sum(v * v for v in v0)), 1e-7)
    n1 = max(math.sqrt(sum(v * v for v in v1)), 1e-7)
    cos = max(-1.0, min(1.0, sum(p / n0 * q / n1 for p, q in zip(v0, v1))))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * p + t * q for p, q in zip(v0, v1)]
    theta = math.acos(cos)
    c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return [c0 * p + c1 * q for p, q in zip(v0, v1)]


def ref_nuslerp(base, xs, weights, row_wise=False, flatten=True):
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    v0, v1 = (x.double() - (base.double() if base is not None else 0) for x in xs)
    if flatten or v0.dim() < 2:
        out = torch.tensor(_slerp_vectors(t, v0.reshape(-1).tolist(), v1.reshape(-1).tolist()),
                           dtype=torch.float64).reshape(v0.shape)
    else:  # each row along the last dim, or (row_wise) along dim 0
        a, b = (v.transpose(0, -1) if row_wise else v for v in (v0, v1))
        rows = [_slerp_vectors(t, p, q) for p, q in zip(a.reshape(-1, a.shape[-1]).tolist(),
                                                         b.reshape(-1, b.shape[-1]).tolist())]
        out = torch.tensor(rows, dtype=torch.float64).reshape(a.shape)
        out = out.transpose(0, -1) if row_wise else out
    return out if base is None else base.double() + out


def ref_multislerp(base, xs, weights, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return xs[0].double()
    origin = base.double() if base is not None else torch.zeros_like(xs[0], dtype=torch.float64)
    vs = [(x.double() - origin).reshape(-1) for x in xs]
    w = [wi / sum(weights) for wi in weights] if normalize else list(weights)
    norms = [v.norm().item() for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    if mean.norm().item() < eps:
        if not any(norms):
            return origin
        assert len(xs) == 2, "mergekit has no answer for > 2 models whose unit vectors cancel"
        return origin + (w[0] * vs[0] + w[1] * vs[1]).reshape(origin.shape)
    mean = mean / mean.norm()
    tangent = sum(wi * (u - torch.dot(u, mean) * mean) for wi, u in zip(w, units))
    length = tangent.norm().item() + eps
    point = mean * math.cos(length) + tangent * (math.sin(length) / length)
    return origin + (point * sum(wi * n for wi, n in zip(w, norms))).reshape(origin.shape)


def ref_sce(base, xs, select_topk):
    b = base.double().reshape(-1)
    tvs = [x.double().reshape(-1) - b for x in xs]
    n = b.numel()
    if select_topk < 1:
        var = [sum((tv[e].item() - sum(t[e].item() for t in tvs) / len(tvs)) ** 2 for tv in tvs) / len(tvs)
               for e in range(n)]
        count = int(sum(v != 0 for v in var) * select_topk) if select_topk > 0 else 0
        kept = set(sorted(range(n), key=lambda e: (-var[e], e))[:count])
        tvs = [torch.tensor([tv[e].item() if e in kept else 0.0 for e in range(n)], dtype=torch.float64)
               for tv in tvs]
    power = [(tv * tv).mean().item() for tv in tvs]
    weights = [p / sum(power) for p in power] if abs(sum(power)) >= 1e-6 else [1 / len(tvs)] * len(tvs)
    out = []
    for e in range(n):
        values = [tv[e].item() for tv in tvs]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [(v > 0 and sign > 0) or (v < 0 and sign < 0) for v in values]
        num = sum(w * v for w, v, a in zip(weights, values, agree) if a)
        den = max(sum(w for w, a in zip(weights, agree) if a), 1e-6)
        out.append(b[e].item() + num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def ref_karcher(xs, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return xs[0].double()
    vs = [x.double().reshape(-1) for x in xs]
    norms = [v.norm().item() for v in vs]
    units = [v / n for v, n in zip(vs, norms) if n > tol]
    if not units:
        return torch.zeros_like(xs[0], dtype=torch.float64)
    alpha = 1 / len(units)
    mean = sum(alpha * u for u in units)
    mean = units[0].clone() if mean.norm().item() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = max(-1.0, min(1.0, torch.dot(mean, u).item()))
            theta = math.acos(dot)
            if theta >= tol:
                tangent = tangent + alpha * theta / math.sin(theta) * (u - dot * mean)
        length = tangent.norm().item()
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * tangent / length
        if mean.norm().item() > tol:
            mean = mean / mean.norm()
    return (sum(norms) / len(xs) * mean).reshape(xs[0].shape)


def _call(method, base, xs, weights=None, params=None, out_dtype=None):
    model_params = [{"weight": w} for w in weights] if weights else [{} for _ in xs]
    return _run(method, base, xs, model_params, params, out_dtype=out_dtype or xs[0].dtype)[0]


SHAPES = [(7, 13), (37,), (3, 5, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.05, 1.0])
def test_nearswap(shape, t):
    base, (x,) = _models(shape, 1, seed=31)
    got = _call("nearswap", base, [x], params={"t": t})
    assert_close_verbose(got, ref_nearswap(base, x, t), rtol=1e-12, atol=1e-12, name=f"nearswap t={t}")
    assert torch.equal(_call("nearswap", base, [base.clone()], params={"t": t}), base)  # zero task vector


@pytest.mark.parametrize("shape", SHAPES + [(1, 1)])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("options", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False,
                                                                      "nuslerp_row_wise": True}])
def test_nuslerp(shape, with_base, options):
    base, xs = _models(shape, 2, seed=32)
    got = _call("nuslerp", base if with_base else None, xs, [0.3, 0.9], options)
    want = ref_nuslerp(base if with_base else None, xs, [0.3, 0.9], options.get("nuslerp_row_wise", False),
                       options.get("nuslerp_flatten", True))
    assert_close_verbose(got, want, rtol=1e-10, atol=1e-12, name=f"nuslerp {shape} {options}")
    zero = _call("nuslerp", base, [base.clone(), base.clone()], [1.0, -1.0], options)  # weights sum 0: t = 0.5
    assert torch.equal(zero, base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp(shape, count, with_base):
    base, xs = _models(shape, count, seed=33 + count)
    weights = [0.5, 1.5, 0.25, 2.0][:count]
    for normalize in (True, False):
        got = _call("multislerp", base if with_base else None, xs, weights, {"normalize_weights": normalize})
        want = ref_multislerp(base if with_base else None, xs, weights, normalize)
        assert_close_verbose(got, want, rtol=1e-10, atol=1e-12, name=f"multislerp {count} {normalize}")
    zero = _call("multislerp", base, [base.clone() for _ in xs], weights)
    assert torch.equal(zero, base)  # zero task vectors


def test_multislerp_cancelling_weights_are_config_errors():
    base, xs = _models((5, 6), 3, seed=3)
    with pytest.raises(MergeConfigError, match="sum to 0"):
        _call("multislerp", base, xs, [1.0, -1.0, 0.0])
    a = torch.randn(5, 6, dtype=torch.float64)
    with pytest.raises(MergeConfigError, match="weighted mean of the unit tensors is zero"):
        _call("multislerp", None, [a, -a, a * 0 + 1e-30], [1.0, 1.0, 0.5], {"normalize_weights": False})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("count", [1, 3])
def test_sce(shape, select_topk, count):
    base, xs = _models(shape, count, seed=34)
    got = _call("sce", base, xs, params={"select_topk": select_topk})
    assert_close_verbose(got, ref_sce(base, xs, select_topk), rtol=1e-12, atol=1e-12, name=f"sce {select_topk}")
    assert torch.equal(_call("sce", base, [base.clone() for _ in xs]), base)  # zero task vectors


def test_sce_equal_variances():
    base = torch.zeros(4, 10, dtype=torch.float64)
    pattern = torch.tensor([1.0, -1.0, 2.0, -2.0, 1.0] * 8, dtype=torch.float64).reshape(4, 10)
    xs = [base + pattern, base - pattern, base + 0.5 * pattern.flip(1)]
    got = _call("sce", base, xs, params={"select_topk": 0.45})
    assert_close_verbose(got, ref_sce(base, xs, 0.45), rtol=1e-12, atol=1e-12, name="sce ties")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_karcher(shape, count):
    _, xs = _models(shape, count, seed=35)
    xs = [x * (1 + i) for i, x in enumerate(xs)]
    for params in ({}, {"max_iter": 2, "tol": 1e-3}):
        got = _call("karcher", None, xs, params=params)
        assert_close_verbose(got, ref_karcher(xs, **params), rtol=1e-10, atol=1e-12, name=f"karcher {params}")
    zeros = [torch.zeros(shape, dtype=torch.float64) for _ in range(max(count, 2))]
    assert torch.equal(_call("karcher", None, zeros), zeros[0])
    one_zero = [xs[0], torch.zeros(shape, dtype=torch.float64)]  # a zero model only shrinks the norm
    assert_close_verbose(_call("karcher", None, one_zero), xs[0] / 2, rtol=1e-12, atol=1e-12, name="zero model")


@pytest.mark.parametrize("method", ["nearswap", "nuslerp", "multislerp", "sce", "karcher"])
def test_interpolating_methods_bf16_inputs(method):
    base, xs = _models((12, 20), 2, seed=36, dtype=torch.bfloat16)
    refs = {"nearswap": lambda: ref_nearswap(base, xs[0], 0.05), "nuslerp": lambda: ref_nuslerp(base, xs, [1, 2]),
            "multislerp": lambda: ref_multislerp(base, xs, [1, 2]), "sce": lambda: ref_sce(base, xs, 0.5),
            "karcher": lambda: ref_karcher(xs)}
    args = {"nearswap": (base, xs[:1], None, {"t": 0.05}), "nuslerp": (base, xs, [1, 2], None),
            "multislerp": (base, xs, [1, 2], None), "sce": (base, xs, None, {"select_topk": 0.5}),
            "karcher": (None, xs, None, None)}[method]
    got = _call(method, *args)
    assert got.dtype == torch.bfloat16
    assert_close_verbose(got, refs[method]().to(torch.bfloat16), rtol=8e-3, atol=2e-3, name=f"{method} bf16")


INTERPOLATING = {  # method: (base or None, models with weights, global parameters, float64 reference)
    "nearswap": ("base", [("ft1", None)], {"t": 0.02}, lambda b, xs: ref_nearswap(b, xs[0], 0.02)),
    "nuslerp": ("base", [("ft1", 0.4), ("ft2", 0.8)], {"nuslerp_flatten": False},
                lambda b, xs: ref_nuslerp(b, xs, [0.4, 0.8], False, False)),
    "multislerp": ("base", [("ft1", 0.6), ("ft2", 0.9), ("ft3", 0.3)], {},
                   lambda b, xs: ref_multislerp(b, xs, [0.6, 0.9, 0.3])),
    "sce": ("base", [("ft1", None), ("ft2", None), ("ft3", None)], {"select_topk": 0.4},
            lambda b, xs: ref_sce(b, xs, 0.4)),
    "karcher": (None, [("ft1", None), ("ft2", None), ("ft3", None)], {"max_iter": 5},
                lambda b, xs: ref_karcher(xs, max_iter=5)),
}


@pytest.mark.parametrize("method", list(INTERPOLATING))
def test_nova_rt_merge_cli_streams_interpolating_methods(tiny_models, tmp_path, method):
    base, models, params, reference = INTERPOLATING[method]
    cfg = {"merge_method": method, "dtype": "float64", "parameters": params,
           "models": [{"model": m, **({"parameters": {"weight": w}} if w is not None else {})} for m, w in models]}
    if base is not None:
        cfg["base_model"] = base
    cfg_path = write_yaml(tiny_models["root"] / f"new_{method}.yaml", cfg)
    out = tmp_path / "out"
    assert cli_main([str(cfg_path), str(out), "--no-progress", "--max-shard-size", "100KB"]) == 0
    merged = load_weights(out)
    inputs = {k: load_weights(tiny_models[k]) for k in ("base", "ft1", "ft2", "ft3")}
    assert set(merged) == set(inputs["base"])
    for name, got in merged.items():
        want = reference(inputs["base"][name], [inputs[m][name] for m, _ in models])
        assert got.dtype == torch.float64
        assert_close_verbose(got, want, rtol=1e-9, atol=1e-12,
                             name=f"{method}:{name} (models seed {tiny_models['seed']})")


def test_nuslerp_without_base_model_and_help(tiny_models, tmp_path, capsys):
    cfg = {"merge_method": "nuslerp", "dtype": "float64", "models": [{"model": "ft1", "parameters": {"weight": 1.0}},
                                                                      {"model": "ft2", "parameters": {"weight": 3.0}}]}
    cfg_path = write_yaml(tiny_models["root"] / "nuslerp_no_base.yaml", cfg)
    assert cli_main([str(cfg_path), str(tmp_path / "out"), "--no-progress"]) == 0
    merged = load_weights(tmp_path / "out")
    ft1, ft2 = load_weights(tiny_models["ft1"]), load_weights(tiny_models["ft2"])
    for name, got in merged.items():
        assert_close_verbose(got, ref_nuslerp(None, [ft1[name], ft2[name]], [1.0, 3.0]), rtol=1e-9, atol=1e-12,
                             name=f"nuslerp:{name}")
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    shown = capsys.readouterr().out
    for line in ("  breadcrumbs: ", "      per model: weight, density=1.0, gamma=0.01", "  della_linear: ",
                 "      per model: weight, density=1.0, epsilon=0.15", "  nuslerp: ", "[optional base_model]",
                 "      global: nuslerp_row_wise=false, nuslerp_flatten=true", "  karcher: ",
                 "      global: max_iter=10, tol=1e-05", "  sce: ", "  nearswap: ", "  multislerp: "):
        assert line in shown, line
