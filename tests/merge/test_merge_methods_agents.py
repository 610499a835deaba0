"""arcee_fusion, ram and ramplus_tl against float64 references written here element by element (Python math, no code
shared with nova_rt.merge.reference_agents), with the edge cases (zero task vectors, one model, equal magnitudes,
epsilon 0, bf16 inputs; these methods have no density), one `nova-rt merge` run per method, their config errors;
and the C++ kernels of nearswap / ram / ramplus_tl (nova_rt._C) bit-equal to the PyTorch path."""

from __future__ import annotations

import math

import pytest
import torch

from nova_rt.merge import MergeConfigError, get_merge
from nova_rt.merge.cli import main as cli_main
from nova_rt.merge.registry import TensorMerge
from tests.helpers import assert_close_verbose
from tests.merge.conftest import load_weights, write_yaml


def _rows(t: torch.Tensor) -> list[list[float]]:
    flat = t.double().reshape(-1, t.shape[-1] if t.dim() else 1)
    return flat.tolist()


def ref_arcee_fusion(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep x - base where |x - base| * KL(softmax(x) + 1e-8 || softmax(base) + 1e-8) of its row reaches
    median + 1.5 IQR (order statistics at floor(q (n - 1)) of the sorted importances)."""
    importance, deltas = [], []
    for b_row, x_row in zip(_rows(base), _rows(x)):
        def softmax(row):
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            return [e / sum(exps) for e in exps]

        p = [v + 1e-8 for v in softmax(x_row)]
        q = [v + 1e-8 for v in softmax(b_row)]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        for bv, xv in zip(b_row, x_row):
            deltas.append((bv, xv - bv))
            importance.append(abs(xv - bv) * kl)
    ordered = sorted(importance)
    last = len(ordered) - 1
    q1, median, q3 = ordered[last // 4], ordered[last // 2], ordered[(3 * last) // 4]
    threshold = median + 1.5 * (q3 - q1)
    out = [bv + (d if imp >= threshold else 0.0) for (bv, d), imp in zip(deltas, importance)]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def ref_ram(base: torch.Tensor, xs: list[torch.Tensor], epsilon: float = 1e-5,
            plus: tuple[float, float] | None = None) -> torch.Tensor:
    b = base.double().reshape(-1).tolist()
    taus = [[xv - bv for xv, bv in zip(x.double().reshape(-1).tolist(), b)] for x in xs]
    counts = [sum(abs(tau[e]) > epsilon for tau in taus) for e in range(len(b))]
    scales = [1.0] * len(xs)
    if plus is not None:
        r, alpha = plus
        for i, tau in enumerate(taus):
            shared = sum(1 for e, v in enumerate(tau) if abs(v) > epsilon and counts[e] > 1)
            unique = sum(1 for e, v in enumerate(tau) if abs(v) > epsilon and counts[e] == 1)
            rho = shared / max(unique, epsilon) if unique else 0.0  # no unique element: the scale multiplies none
            scales[i] = 1 + r * min(max(rho, 0.0), alpha)
    out = []
    for e, bv in enumerate(b):
        counted = [(tau[e], scale) for tau, scale in zip(taus, scales) if abs(tau[e]) > epsilon]
        if len(counted) == 1:
            out.append(bv + counted[0][0] * counted[0][1])
        else:
            out.append(bv + sum(v for v, _ in counted) / max(len(counted), 1))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def _run(method, base, xs, params=None, *, out_dtype=None, impl="auto", out=None):
    m = get_merge(method)
    full = {k: spec.default for k, spec in m.global_params.items()} | (params or {})
    merge = TensorMerge(name="t", base=base, tensors=xs, model_params=[{} for _ in xs], params=full,
                        out_dtype=out_dtype or base.dtype, impl=impl, out=out)
    return m(merge)


def _models(shape, count, seed, dtype=torch.float64, density=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    xs = []
    for _ in range(count):
        delta = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        xs.append((base + delta * (torch.rand(shape, generator=g, dtype=torch.float64) < density)).to(dtype))
    return base.to(dtype), xs


SHAPES = [(7, 13), (37,), (3, 5, 2), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion(shape):
    base, (x,) = _models(shape, 1, seed=41)
    got = _run("arcee_fusion", base, [x])
    want = ref_arcee_fusion(base, x)
    assert_close_verbose(got, want, rtol=1e-12, atol=1e-12, name=f"arcee_fusion {shape}")
    if base.numel() > 4:
        kept = (got != base).sum().item()
        assert 0 < kept < base.numel()  # upper outliers only
    assert torch.equal(_run("arcee_fusion", base, [base.clone()]), base)  # zero task vector


def test_arcee_fusion_equal_importances_and_bf16():
    # identical rows (one KL for all) and exact |tau| in {0.5, 1}: heavy ties among the importances
    base = (torch.randint(-8, 8, (1, 12), generator=torch.Generator().manual_seed(3)) / 4).double().repeat(8, 1)
    for row, kept in (([0.5, -1.0, 0.5, 0.5, -0.5, 1.0], 0.0), ([0.5, -0.5, 0.5, 1.0, 0.5, -0.5], 1.0)):
        # 1/3 at |tau| = 1: q3 is 1 KL, threshold 1.25 KL, nothing kept; 1/6: q1 = median = q3, all kept
        x = base + torch.tensor(row * 16, dtype=torch.float64).reshape(8, 12)
        got = _run("arcee_fusion", base, [x])
        assert_close_verbose(got, ref_arcee_fusion(base, x), rtol=0, atol=0, name=f"equal importances {row}")
        assert (got != base).double().mean().item() == kept
    base16, (x16,) = _models((16, 24), 1, seed=42, dtype=torch.bfloat16)
    got = _run("arcee_fusion", base16, [x16])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, _run("arcee_fusion", base16.float(), [x16.float()]).to(torch.bfloat16))
    assert_close_verbose(got.double(), ref_arcee_fusion(base16, x16).to(torch.bfloat16).double(), rtol=0, atol=0,
                         name="arcee_fusion bf16")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_ram(method, shape, count):
    base, xs = _models(shape, count, seed=43 + count, density=0.5)
    for params in ({}, {"epsilon": 0.05, "r": 0.5, "alpha": 1.0}, {"epsilon": 0.0}):
        params = {k: v for k, v in params.items() if k in get_merge(method).global_params}
        got = _run(method, base, xs, params)
        plus = (params.get("r", 0.1), params.get("alpha", 0.2)) if method == "ramplus_tl" else None
        want = ref_ram(base, xs, params.get("epsilon", 1e-5), plus)
        assert_close_verbose(got, want, rtol=1e-12, atol=1e-12, name=f"{method} {shape} {count} {params}")
    assert torch.equal(_run(method, base, [base.clone() for _ in xs]), base)  # zero task vectors


def test_ram_counts_unique_overlapping_and_equal_changes():
    base = torch.zeros(2, 4, dtype=torch.float64)
    a = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, -3.0, 1e-6, 0.5]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0, 4.0, 0.0], [3.0, 3.0, 0.0, 0.5]], dtype=torch.float64)
    got = _run("ram", base, [a, b])
    # unique changes kept whole, shared ones averaged (equal or opposite), <= epsilon ignored
    assert torch.equal(got, torch.tensor([[1.0, 2.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.5]], dtype=torch.float64))
    plus = _run("ramplus_tl", base, [a, b], {"r": 1.0, "alpha": 10.0})
    # a: 4 shared, 1 unique -> x(1 + min(4, 10)) = x5; b: 4 shared, 1 unique -> x5
    assert torch.equal(plus, torch.tensor([[1.0, 10.0, 20.0, 0.0], [3.0, 0.0, 0.0, 0.5]], dtype=torch.float64))
    assert_close_verbose(plus, ref_ram(base, [a, b], 1e-5, (1.0, 10.0)), rtol=0, atol=0, name="ramplus")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_bf16_inputs(method):
    base, xs = _models((16, 24), 3, seed=44, dtype=torch.bfloat16, density=0.4)
    got = _run(method, base, xs)
    assert got.dtype == torch.bfloat16
    want = ref_ram(base, xs, 1e-5, (0.1, 0.2) if method == "ramplus_tl" else None)
    assert_close_verbose(got, want.to(torch.bfloat16), rtol=8e-3, atol=2e-3, name=f"{method} bf16")


# ---- C++ kernels (nova_rt._C) against the PyTorch path: bit-equal ----

KERNEL_CASES = {  # method: (models, global parameters)
    "nearswap": (1, {"t": 0.05}), "ram": (3, {}), "ramplus_tl": (3, {"r": 0.3, "alpha": 0.5, "epsilon": 0.02})}


def _ext():
    from nova_rt._C_loader import ExtensionUnavailable, load_extension

    try:
        ext = load_extension()
    except ExtensionUnavailable as exc:
        pytest.skip(f"nova_rt._C unavailable: {exc}")
    if not hasattr(ext, "ram"):
        pytest.fail("nova_rt._C predates the nearswap/ram kernels: rebuild it (make install)")
    return ext


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so signed zeros and NaN payloads count too)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("method", list(KERNEL_CASES))
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32), (torch.float64, torch.float64),
                                              (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("numel", [1, 1000, 70_001])  # 70k: several OpenMP blocks, a ragged last block
def test_kernels_equal_pytorch_bitwise(method, dtype, out_dtype, numel):
    _ext()
    count, params = KERNEL_CASES[method]
    base, xs = _models((numel,), count, seed=numel + count, dtype=dtype, density=0.5)
    xs[0][: numel // 7] = base[: numel // 7]  # stretches of zero task vectors
    ext = _run(method, base, xs, params, out_dtype=out_dtype, impl="ext")
    ref = _run(method, base, xs, params, out_dtype=out_dtype, impl="torch")
    assert ext.dtype == out_dtype
    assert torch.equal(_bits(ext), _bits(ref)), \
        f"{method} {dtype}->{out_dtype}: {(ext != ref).sum().item()} of {numel} elements differ"
    out = torch.empty(numel, dtype=out_dtype)
    assert _run(method, base, xs, params, out_dtype=out_dtype, impl="ext", out=out) is out
    assert torch.equal(_bits(out), _bits(ref))


def test_kernels_thread_count_independent_and_used_by_auto(monkeypatch):
    _ext()
    base, xs = _models((300_000,), 3, seed=7, dtype=torch.float32, density=0.3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("ramplus_tl", base, xs, impl="ext")
        torch.set_num_threads(2)
        two = _run("ramplus_tl", base, xs, impl="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    import nova_rt.merge.ops_extra as ops_extra

    monkeypatch.setattr(ops_extra, "ram_ref", lambda *a, **k: pytest.fail("auto should run the C++ kernel"))
    assert torch.equal(_run("ramplus_tl", base, xs), one)


def test_arcee_fusion_ext_and_bad_epsilon_are_config_errors():
    base, xs = _models((4, 4), 2, seed=2)
    with pytest.raises(MergeConfigError, match="no C\\+\\+ kernel"):
        _run("arcee_fusion", base, xs[:1], impl="ext")
    for method in ("ram", "ramplus_tl"):
        with pytest.raises(MergeConfigError, match=f"{method}: epsilon = -0.1 must be >= 0"):
            _run(method, base, xs, {"epsilon": -0.1})


# ---- the streaming engine and the CLI ----

AGENT_CONFIGS = {
    "arcee_fusion": {"base_model": "base", "models": [{"model": "base"}, {"model": "ft1"}]},
    "ram": {"base_model": "base", "models": [{"model": f"agent{i}"} for i in (1, 2, 3)]},
    "ramplus_tl": {"base_model": "base", "parameters": {"r": 0.4, "alpha": 0.3, "epsilon": 1e-4},
                   "models": [{"model": f"agent{i}"} for i in (1, 2, 3)]},
}


@pytest.mark.parametrize("method", list(AGENT_CONFIGS))
def test_nova_rt_merge_cli_streams_each_method(tiny_models, sparse_agents, tmp_path, method):
    cfg = {"merge_method": method, "dtype": "float64", **AGENT_CONFIGS[method]}
    cfg_path = write_yaml(tiny_models["root"] / f"agents_{method}.yaml", cfg)
    out = tmp_path / "out"
    assert cli_main([str(cfg_path), str(out), "--no-progress", "--max-shard-size", "100KB"]) == 0
    merged = load_weights(out)
    inputs = {k: load_weights(v) for k, v in {**tiny_models, **sparse_agents}.items() if k not in ("root", "seed")}
    params = cfg.get("parameters", {})
    assert set(merged) == set(inputs["base"])
    for name, got in merged.items():
        base = inputs["base"][name].double()
        if method == "arcee_fusion":
            want = ref_arcee_fusion(base, inputs["ft1"][name].double())
        else:
            xs = [inputs[f"agent{i}"][name].double() for i in (1, 2, 3)]
            plus = (params["r"], params["alpha"]) if method == "ramplus_tl" else None
            want = ref_ram(base, xs, params.get("epsilon", 1e-5), plus)
        assert got.dtype == torch.float64
        assert_close_verbose(got, want, rtol=1e-12, atol=1e-12,
                             name=f"{method}:{name} (models seed {tiny_models['seed']})")


@pytest.mark.parametrize("snippet, message", [
    ({"merge_method": "arcee_fusion", "models": [{"model": "ft1"}, {"model": "ft2"}]},
     "exactly 1 models besides the base"),
    ({"merge_method": "arcee_fusion", "parameters": {"weight": 1.0}},
     r"unknown parameter 'weight' for merge_method arcee_fusion \(supported: none\)"),
    ({"merge_method": "ram", "parameters": {"alpha": 0.5}},
     r"unknown parameter 'alpha' for merge_method ram \(supported: epsilon\)"),
    ({"merge_method": "ramplus_tl", "models": [{"model": "ft1", "parameters": {"density": 0.5}}]},
     r"unknown parameter 'density' for merge_method ramplus_tl \(supported: alpha, epsilon, r\)"),
    ({"merge_method": "ramplus_tl", "parameters": {"r": "big"}}, "parameter 'r' must be a number"),
    ({"merge_method": "ram", "parameters": {"epsilon": -1.0}}, "epsilon = -1.0 must be >= 0"),
    ({"merge_method": "ram_plus"},
     r"unknown merge_method 'ram_plus'; supported: arcee_fusion, breadcrumbs, .*, ram, ramplus_tl, sce, slerp"),
])
def test_cli_config_errors_exit_2_naming_the_choices(tiny_models, tmp_path, capsys, snippet, message):
    cfg = {"base_model": "base", "models": [{"model": "ft1"}], **snippet}
    cfg_path = write_yaml(tiny_models["root"] / "bad_agents.yaml", cfg)
    assert cli_main([str(cfg_path), str(tmp_path / "never"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nova-rt merge: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "never").exists()


def test_help_lists_the_new_methods_and_their_parameters(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    shown = capsys.readouterr().out
    for line in ("  arcee_fusion: ", "[base_model]\n      no parameters\n", "  ram: ", "      global: epsilon=1e-05",
                 "  ramplus_tl: ",
                 "      global: r=0.1, alpha=0.2, epsilon=1e-05"):
        assert line in shown, line


@pytest.mark.parametrize("count", [0, 1, 17, 250, 499, 500, 600])
def test_sce_top_count_selection_equals_a_stable_sort(count):
    """sce's top-variance mask selects instead of sorting: the same elements as a stable descending sort, equal
    values in index order (heavy ties here), NaN included."""
    from nova_rt.merge.reference_extra import top_count_mask

    values = torch.randint(0, 9, (500,), generator=torch.Generator().manual_seed(count)).double() / 4
    for case in (values, torch.where(values == 1.0, float("nan"), values)):
        want = torch.zeros(500, dtype=torch.bool)
        want[torch.sort(case, descending=True, stable=True).indices[:count]] = True
        assert torch.equal(top_count_mask(case, count), want), count


@pytest.mark.parametrize("start, stop", [(0, 0), (0, 1), (0, 500), (3, 17), (120, 380), (250, 251), (499, 500),
                                         (400, 700), (-5, 30)])
def test_breadcrumbs_rank_range_selection_equals_a_stable_sort(start, stop):
    """Breadcrumbs' band selects instead of sorting: the elements at ascending stable-sort positions [start, stop),
    equal values in index order (heavy ties here), NaN included."""
    from nova_rt.merge.reference import rank_range_mask

    values = torch.randint(0, 9, (500,), generator=torch.Generator().manual_seed(stop)).double() / 4
    for case in (values, torch.where(values == 1.0, float("nan"), values), torch.full((500,), 0.5)):
        want = torch.zeros(500, dtype=torch.bool)
        want[torch.sort(case, stable=True).indices[max(start, 0):stop]] = True
        assert torch.equal(rank_range_mask(case, start, stop), want), (start, stop)
