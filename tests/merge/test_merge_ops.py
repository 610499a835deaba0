"""Per-tensor merge ops: hand-computed examples, the PyTorch reference against naive fp64 loops, and the C++
extension against the reference on random tensors (fp32 / fp16 / bf16, odd and 1-D shapes)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from nova_rt._C_loader import extension_available
from nova_rt.merge import ops
from nova_rt.merge.reference import (
    SPARSIFY_MAGNITUDE,
    SPARSIFY_NONE,
    SPARSIFY_RANDOM,
    GtaParams,
    dare_mask_ref,
    gta_ref,
    model_stock_ref,
    slerp_ref,
    weighted_sum_ref,
)
from tests.helpers import assert_close_verbose, assert_no_worse_than_eager

HAS_EXT = extension_available()
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason="nova_rt._C unavailable (NOVA_RT_NO_EXT=1, or not installed and no compiler)")
IMPLS = ["torch", pytest.param("ext", marks=needs_ext)]
SHAPES = [(7, 13), (1,), (1000,), (64, 257), (3, 5, 7), (1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _t(vals, dtype=torch.float32):
    return torch.tensor(vals, dtype=dtype)


# ---------------------------------------------------------------- hand-computed two-tensor examples

@pytest.mark.parametrize("impl", IMPLS)
def test_linear_by_hand(impl):
    x1, x2 = _t([1.0, 2.0, -3.0, 4.0]), _t([3.0, -2.0, 1.0, 0.5])
    out = ops.weighted_sum([x1, x2], [1.0, 3.0], 1 / 4, impl=impl)  # (1*x1 + 3*x2) / 4
    assert_close_verbose(out, _t([2.5, -1.0, 0.0, 1.375]), rtol=0, atol=1e-6, name="linear")


@pytest.mark.parametrize("impl", IMPLS)
def test_task_arithmetic_by_hand(impl):
    base = _t([1.0, 1.0, 1.0, 1.0])
    x1, x2 = _t([2.0, 0.0, 1.0, 3.0]), _t([1.0, 3.0, -1.0, 1.0])  # tau1 = [1,-1,0,2], tau2 = [0,2,-2,0]
    p = GtaParams(weights=(0.5, 1.0), densities=(1.0, 1.0), lam=2.0)
    out = ops.gta(base, [x1, x2], p, impl=impl)  # 1 + 2 * ([.5,-.5,0,1] + [0,2,-2,0])
    assert_close_verbose(out, _t([2.0, 4.0, -3.0, 3.0]), rtol=0, atol=1e-6, name="task_arithmetic")
    normed = ops.gta(base, [x1, x2], GtaParams(weights=(0.5, 1.0), densities=(1.0, 1.0), normalize=True),
                     impl=impl)  # 1 + ([.5,-.5,0,1] + [0,2,-2,0]) / 1.5
    assert_close_verbose(normed, _t([4 / 3, 2.0, -1 / 3, 5 / 3]), rtol=0, atol=1e-6, name="task_arithmetic norm")


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_by_hand(impl):
    base = _t([1.0, 1.0, 1.0, 1.0])
    x1, x2 = _t([5.0, 0.0, 3.0, -2.0]), _t([-1.0, 4.0, 2.0, 0.0])  # tau1 = [4,-1,2,-3], tau2 = [-2,3,1,-1]
    # density .5 keeps 2 of 4: tau1 -> [4,0,0,-3], tau2 -> [-2,3,0,0]; weights 1, 3 -> [-6,9,0,0].
    # sum [-2,9,0,-3] elects signs [-,+,+,-]; agreeing entries: e0 -6 (w 3), e1 9 (w 3), e2 none, e3 -3 (w 1).
    p = GtaParams(weights=(1.0, 3.0), densities=(0.5, 0.5), sparsify=SPARSIFY_MAGNITUDE, consensus=True,
                  normalize=True)
    out = ops.gta(base, [x1, x2], p, impl=impl)
    assert_close_verbose(out, _t([1 - 2.0, 1 + 3.0, 1.0, 1 - 3.0]), rtol=0, atol=1e-6, name="ties")
    # Equal magnitudes: |tau| = [2,2,2,2] keeps the first two by index, so only elements 0 and 1 move.
    tie = ops.gta(base, [base + 2, base - 2], GtaParams(weights=(1.0, 1.0), densities=(0.5, 0.5),
                                                        sparsify=SPARSIFY_MAGNITUDE, consensus=True, normalize=True),
                  impl=impl)
    assert_close_verbose(tie, _t([3.0, 3.0, 1.0, 1.0]), rtol=0, atol=1e-6, name="ties tie-break")


def _splitmix(z: int) -> int:  # written out again here so the test does not trust the module's copy
    m = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _keep(seed: int, tid: int, model: int, e: int, density: float) -> bool:
    stream = _splitmix(_splitmix(_splitmix(seed) ^ tid) ^ model)
    return (_splitmix((stream + e) & ((1 << 64) - 1)) >> 40) < density * 2**24


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("consensus", [False, True])
def test_dare_by_hand(impl, consensus):
    seed, tid = _seed(), 12345
    base = _t([1.0, -1.0, 0.5, 2.0, 1.0, 0.0, 3.0, -2.0])
    taus = [[0.5, -1.0, 2.0, 1.5, -0.25, 1.0, -3.0, 0.75], [-1.5, 2.0, 1.0, -0.5, 0.5, -2.0, 1.0, 0.25]]
    w, dens = (1.0, 0.5), (0.5, 0.25)
    kept = [[t * (1 / d) if _keep(seed, tid, i, e, d) else 0.0 for e, t in enumerate(tau)]
            for i, (tau, d) in enumerate(zip(taus, dens))]
    weighted = [[wi * v for v in row] for wi, row in zip(w, kept)]
    expected = []
    for e in range(8):
        vals = [weighted[0][e], weighted[1][e]]
        if consensus:
            sign = 1 if sum(vals) >= 0 else -1
            vals = [v for v in vals if v * sign > 0]
        expected.append(base[e].item() + sum(vals))
    p = GtaParams(weights=w, densities=dens, sparsify=SPARSIFY_RANDOM, consensus=consensus, rescale=True,
                  seed=seed, tensor_id=tid)
    out = ops.gta(base, [base + _t(t) for t in taus], p, impl=impl)
    assert_close_verbose(out, _t(expected), rtol=0, atol=1e-5, name=f"dare seed={seed}")


@pytest.mark.parametrize("impl", IMPLS)
def test_slerp_by_hand(impl):
    a, b = _t([2.0, 0.0]), _t([0.0, 3.0])  # orthogonal: theta = pi/2, coefficients sin(pi/3), sin(pi/6) at t=1/3
    out = ops.slerp(a, b, 1 / 3, impl=impl)
    assert_close_verbose(out, _t([math.sqrt(3), 1.5]), rtol=0, atol=1e-6, name="slerp")
    colinear = ops.slerp(_t([1.0, 2.0]), _t([2.0, 4.0]), 0.25, impl=impl)  # falls back to lerp
    assert_close_verbose(colinear, _t([1.25, 2.5]), rtol=0, atol=1e-6, name="slerp lerp fallback")


@pytest.mark.parametrize("impl", IMPLS)
def test_model_stock_by_hand(impl):
    # Row 0: tau1 = [3,4,0], tau2 = [4,3,0] -> cos 24/25, t = 2c / (1 + c) = 48/49, out = base + t * [3.5,3.5,0].
    # Row 1: tau1 = [1,0,0], tau2 = [0,1,0] -> cos 0, t = 0, out = base.
    base = _t([[1.0, -1.0, 2.0], [0.5, 0.5, 0.5]])
    x1 = base + _t([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    x2 = base + _t([[4.0, 3.0, 0.0], [0.0, 1.0, 0.0]])
    out = ops.model_stock(base, [x1, x2], row_len=3, impl=impl)
    t = 48 / 49
    expected = _t([[1 + 3.5 * t, -1 + 3.5 * t, 2.0], [0.5, 0.5, 0.5]])
    assert_close_verbose(out, expected, rtol=0, atol=1e-6, name="model_stock filter_wise")
    whole = ops.model_stock(base[0], [x1[0], x2[0]], impl=impl)
    assert_close_verbose(whole, expected[0], rtol=0, atol=1e-6, name="model_stock")


# ---------------------------------------------------------------- reference vs naive fp64 loops

def _naive_gta(base, xs, p: GtaParams):
    b, n = base.reshape(-1).tolist(), base.numel()
    rows = []
    for i, x in enumerate(xs):
        tau = [xv - bv for xv, bv in zip(x.reshape(-1).tolist(), b)]
        if p.sparsify == SPARSIFY_MAGNITUDE:
            k = n if p.densities[i] >= 1 else max(1, int(p.densities[i] * n))
            keep = set(sorted(range(n), key=lambda e: -abs(tau[e]))[:k])  # Python's sort is stable
            tau = [t if e in keep else 0.0 for e, t in enumerate(tau)]
        rows.append([p.weights[i] * t for t in tau])
    out = []
    for e in range(n):
        vals, ws = [r[e] for r in rows], list(p.weights)
        if p.consensus:
            sign = 1 if sum(vals) >= 0 else -1
            agree = [j for j, v in enumerate(vals) if v * sign > 0]
            vals, div = [vals[j] for j in agree], sum(ws[j] for j in agree) or 1.0
        else:
            div = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
        mix = sum(vals) / (div if p.normalize else 1.0)
        out.append(b[e] + p.lam * mix)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("shape", [(7, 13), (1,), (33,)])
@pytest.mark.parametrize("sparsify, consensus", [(SPARSIFY_NONE, False), (SPARSIFY_MAGNITUDE, True),
                                                 (SPARSIFY_MAGNITUDE, False), (SPARSIFY_NONE, True)])
def test_gta_reference_matches_naive_loops(shape, sparsify, consensus):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    xs = [base + torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    p = GtaParams(weights=(0.7, -0.4, 1.3), densities=(0.3, 0.55, 1.0), sparsify=sparsify, consensus=consensus,
                  normalize=True, lam=0.8)
    assert_close_verbose(gta_ref(base, xs, p, torch.float64), _naive_gta(base, xs, p), rtol=1e-12, atol=1e-12,
                         name=f"gta_ref seed={seed}")


def test_model_stock_and_slerp_reference_match_naive_loops():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 9, generator=g, dtype=torch.float64)
    xs = [base + torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    for row_len in (0, 9):
        cols = row_len or base.numel()
        expected = []
        for r in range(base.numel() // cols):
            sl = slice(r * cols, (r + 1) * cols)
            taus = [(x.reshape(-1)[sl] - base.reshape(-1)[sl]).tolist() for x in xs]
            cosines = [sum(a * b for a, b in zip(taus[i], taus[j])) / math.sqrt(sum(a * a for a in taus[i]) *
                                                                                sum(b * b for b in taus[j]))
                       for i in range(3) for j in range(i + 1, 3)]
            c = sum(cosines) / 3
            t = 3 * c / (1 + 2 * c)
            for e in range(cols):
                mean = sum(x.reshape(-1)[sl][e].item() for x in xs) / 3
                expected.append(t * mean + (1 - t) * base.reshape(-1)[sl][e].item())
        out = model_stock_ref(base, xs, row_len, torch.float64)
        assert_close_verbose(out.reshape(-1), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10,
                             name=f"model_stock_ref row_len={row_len} seed={seed}")
    a, b = xs[0].reshape(-1).tolist(), xs[1].reshape(-1).tolist()
    cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    th = math.acos(cos)
    expected = [(math.sin(0.3 * th) * x + math.sin(0.7 * th) * y) / math.sin(th) for x, y in zip(a, b)]
    assert_close_verbose(slerp_ref(xs[0], xs[1], 0.7, torch.float64).reshape(-1),
                         torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10,
                         name=f"slerp_ref seed={seed}")


def test_dare_mask_reference_matches_python_ints_and_density():
    seed = _seed()
    mask = dare_mask_ref((50,), 0.3, seed, 77, 2)
    assert mask.tolist() == [_keep(seed, 77, 2, e, 0.3) for e in range(50)], f"seed={seed}"
    big = dare_mask_ref((200_000,), 0.3, seed, 5, 0)
    frac = big.double().mean().item()  # binomial sd = sqrt(.3 * .7 / 2e5) ~ 0.001
    assert abs(frac - 0.3) < 0.006, f"keep fraction {frac} (seed={seed})"
    other = dare_mask_ref((200_000,), 0.3, seed, 5, 1)
    assert (big == other).double().mean().item() < 0.62, f"masks of two models are correlated (seed={seed})"


# ---------------------------------------------------------------- extension vs reference on random tensors

def _inputs(shape, dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def _check_ext(name, ext_out, ref_out, seed):
    ulp = torch.finfo(ref_out.dtype).eps
    scale = max(ref_out.double().abs().max().item(), 1.0) if ref_out.numel() else 1.0
    assert ext_out.dtype == ref_out.dtype, f"{name}: dtype {ext_out.dtype} != {ref_out.dtype}"
    assert_close_verbose(ext_out, ref_out, rtol=0, atol=2 * ulp * scale + 1e-6, name=f"{name} seed={seed}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_extension_matches_reference(shape, dtype):
    seed = _seed()
    base, xs = _inputs(shape, dtype, 3, seed)
    w = [0.5, 1.25, -0.3]
    _check_ext("weighted_sum", ops.weighted_sum(xs, w, 0.7, impl="ext"),
               weighted_sum_ref(xs, w, 0.7, dtype), seed)
    for sparsify, consensus in [(SPARSIFY_NONE, False), (SPARSIFY_MAGNITUDE, True), (SPARSIFY_RANDOM, False),
                                (SPARSIFY_RANDOM, True)]:
        p = GtaParams(weights=tuple(w), densities=(0.4, 0.75, 0.1), sparsify=sparsify, consensus=consensus,
                      normalize=consensus, lam=1.5, rescale=True, seed=seed, tensor_id=seed * 7)
        _check_ext(f"gta{sparsify}{consensus}", ops.gta(base, xs, p, impl="ext"), gta_ref(base, xs, p, dtype),
                   seed)
    _check_ext("slerp", ops.slerp(xs[0], xs[1], 0.35, impl="ext"), slerp_ref(xs[0], xs[1], 0.35, dtype), seed)
    for row_len in (0, shape[-1]):
        _check_model_stock(ops.model_stock(base, xs, row_len, impl="ext"), base, xs, row_len, dtype, seed)


def _check_model_stock(ext_out, base, xs, row_len, dtype, seed):
    """Model Stock's t = n*cos / (1 + (n-1)*cos) is ill-conditioned where a row's mean cosine nears -1/(n-1) (short
    rows of random offsets get there): two fp32 implementations that sum a row's dot products in different orders then
    differ by more than a few ulp of the output. The bound adds to _check_ext's the fp32 error of the mean cosine
    (8 ulp * sqrt(row length)) carried through dt/dcos = n / den^2 onto |mean - base|, and the rounding of
    t*mean + (1-t)*base, whose terms can be much larger than their sum."""
    ref = model_stock_ref(base, xs, row_len, dtype)
    assert ext_out.dtype == ref.dtype, f"model_stock: dtype {ext_out.dtype} != {ref.dtype}"
    cols = row_len if row_len > 0 else max(base.numel(), 1)
    b = base.double().reshape(-1, cols)
    ws = [x.double().reshape(-1, cols) for x in xs]
    offs = [w - b for w in ws]
    n = len(ws)
    cos = torch.stack([(offs[i] * offs[j]).sum(-1) / (offs[i].norm(dim=-1) * offs[j].norm(dim=-1)).clamp(min=1e-6)
                       for i in range(n) for j in range(i + 1, n)]).mean(0).unsqueeze(-1)
    den = 1 + (n - 1) * cos
    t = n * cos / den
    mean = torch.stack(ws).mean(0)
    eps32 = torch.finfo(torch.float32).eps
    dt = n / den.pow(2).clamp(min=1e-12) * 8 * eps32 * math.sqrt(cols)
    bound = (dt * (mean - b).abs() + 2 * eps32 * (t.abs() * mean.abs() + (1 - t).abs() * b.abs())).reshape(base.shape)
    ulp = torch.finfo(dtype).eps
    scale = max(ref.double().abs().max().item(), 1.0) if ref.numel() else 1.0
    err = (ext_out.double() - ref.double()).abs()
    bad = err > bound + 2 * ulp * scale + 1e-6
    assert not bad.any(), (f"model_stock seed={seed}: {int(bad.sum())}/{err.numel()} elements beyond the bound; max "
                           f"excess {(err - bound).max().item():.3e}, row cosines {cos.flatten()[:4].tolist()}")


@needs_ext
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
def test_extension_bit_identical_to_reference(in_dtype, out_dtype):
    """Linear, task arithmetic and TIES round every product and sum like PyTorch's eager ops (no FMA contraction),
    so the extension equals the reference (and mergekit) bit for bit."""
    seed = _seed()
    base, xs = _inputs((129, 257), in_dtype, 3, seed)
    w = [0.5, 1.25, -0.3]
    assert torch.equal(ops.weighted_sum(xs, w, 0.7, out_dtype=out_dtype, impl="ext"),
                       weighted_sum_ref(xs, w, 0.7, out_dtype)), f"weighted_sum seed={seed}"
    for sparsify, consensus, normalize in [(SPARSIFY_NONE, False, False), (SPARSIFY_NONE, False, True),
                                           (SPARSIFY_NONE, True, True), (SPARSIFY_MAGNITUDE, True, True)]:
        p = GtaParams(weights=tuple(w), densities=(0.4, 0.75, 0.1), sparsify=sparsify, consensus=consensus,
                      normalize=normalize, lam=0.9)
        assert torch.equal(ops.gta(base, xs, p, out_dtype=out_dtype, impl="ext"),
                           gta_ref(base, xs, p, out_dtype)), f"gta {sparsify} {consensus} {normalize} seed={seed}"


@needs_ext
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_extension_output_dtype_and_fp64_oracle(out_dtype):
    """fp32 inputs merged straight into another dtype: no worse than the reference against an fp64 oracle."""
    seed = _seed()
    base, xs = _inputs((129, 33), torch.float32, 3, seed)
    b64, x64 = base.double(), [x.double() for x in xs]
    p = GtaParams(weights=(0.3, 0.6, 0.9), densities=(1.0, 1.0, 1.0), normalize=True, lam=1.2)
    cases = {
        "weighted_sum": (lambda bk: ops.weighted_sum(xs, [0.2, 0.3, 0.5], 1.0, out_dtype=out_dtype, impl=bk),
                         weighted_sum_ref(x64, [0.2, 0.3, 0.5], 1.0, torch.float64)),
        "gta": (lambda bk: ops.gta(base, xs, p, out_dtype=out_dtype, impl=bk), gta_ref(b64, x64, p, torch.float64)),
        "slerp": (lambda bk: ops.slerp(xs[0], xs[2], 0.6, out_dtype=out_dtype, impl=bk),
                  slerp_ref(x64[0], x64[2], 0.6, torch.float64)),
        "model_stock": (lambda bk: ops.model_stock(base, xs, 33, out_dtype=out_dtype, impl=bk),
                        model_stock_ref(b64, x64, 33, torch.float64)),
    }
    for name, (run, oracle) in cases.items():
        out = run("ext")
        assert out.dtype == out_dtype
        assert_no_worse_than_eager(out, run("torch"), oracle, name=f"{name}->{out_dtype} seed={seed}")


def _magnitude_inputs(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "small_bf16":  # bf16 deltas: many equal magnitudes
        return _inputs((37, 29), torch.bfloat16, 2, seed)
    if kind == "large_bf16":  # > 2^18 elements: sampled bracket; ~2% of elements share the threshold's value
        base = (torch.randn(600, 1000, generator=g) * 0.02).bfloat16()
        return base, [(base.float() + 0.002 * torch.randn(600, 1000, generator=g)).bfloat16() for _ in range(2)]
    if kind == "large_fp32":  # distinct magnitudes, a 1-D tensor with a ragged last block
        base = torch.randn(400_003, generator=g)
        return base, [base + torch.randn(400_003, generator=g) for _ in range(2)]
    # large_levels: task vectors on 5 levels, so the threshold's value holds ~20% of all elements
    base = torch.zeros(300_000)
    return base, [torch.randint(-2, 3, (300_000,), generator=g).float() * 0.5 for _ in range(2)]


@needs_ext
@pytest.mark.parametrize("method", ["sampled", "radix"])
@pytest.mark.parametrize("kind", ["small_bf16", "large_bf16", "large_fp32", "large_levels"])
def test_extension_magnitude_threshold_matches_stable_sort(kind, method):
    """Both selections (sampled bracket, radix) keep exactly the first k of a stable descending sort."""
    from nova_rt._C_loader import load_extension

    seed = _seed()
    base, xs = _magnitude_inputs(kind, seed)
    densities = [0.3, 0.01] if kind != "large_levels" else [0.5, 0.9]
    thr, cutoff = load_extension().magnitude_params(base, xs, densities, method=method)
    for i, x in enumerate(xs):
        d = (x.float() - base.float()).abs().reshape(-1)
        k = max(1, int(densities[i] * d.numel()))
        order = torch.sort(d, descending=True, stable=True).indices[:k]
        assert d[order[-1]].item() == thr[i], f"{kind}/{method} model {i}: threshold (seed={seed})"
        kept = (d > thr[i]) | ((d == thr[i]) & (torch.arange(d.numel()) < cutoff[i]))
        assert int(kept.sum()) == k and bool(kept[order].all()), f"{kind}/{method} model {i}: kept set (seed={seed})"


@pytest.mark.parametrize("impl", IMPLS)
def test_out_argument_is_written_and_returned(impl):
    """out= (the streaming merge's slot in the output file): same values as a fresh result, written in place."""
    seed = _seed()
    base, xs = _inputs((65, 33), torch.bfloat16, 2, seed)
    p = GtaParams(weights=(0.5, 0.8), densities=(0.4, 0.6), sparsify=SPARSIFY_MAGNITUDE, consensus=True,
                  normalize=True)
    runs = {
        "weighted_sum": lambda **kw: ops.weighted_sum([base, *xs], [0.2, 0.3, 0.5], 1.0, impl=impl, **kw),
        "gta": lambda **kw: ops.gta(base, xs, p, impl=impl, **kw),
        "slerp": lambda **kw: ops.slerp(xs[0], xs[1], 0.3, impl=impl, **kw),
        "model_stock": lambda **kw: ops.model_stock(base, xs, 0, impl=impl, **kw),
    }
    for name, run in runs.items():
        want = run(out_dtype=torch.float32)
        out = torch.full((65, 33), float("nan"))
        got = run(out_dtype=torch.float32, out=out)
        assert got.data_ptr() == out.data_ptr(), f"{name}: result not written into out"
        assert torch.equal(out, want), f"{name} (seed={seed})"


@needs_ext
def test_extension_rejects_bad_out():
    from nova_rt._C_loader import load_extension

    ext, a = load_extension(), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="weighted_sum: out has shape"):
        ext.weighted_sum([a], [1.0], 1.0, torch.float32, out=torch.empty(5, 4))
    with pytest.raises(RuntimeError, match="gta: out is BFloat16 but out_dtype is Float"):
        ext.gta(a, [a], [1.0], [1.0], 0, False, False, 1.0, False, 0, 0, torch.float32,
                out=torch.empty(4, 5, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="model_stock: out must be contiguous"):
        ext.model_stock(a, [a, a], 0, torch.float32, out=torch.empty(5, 4).t())


@needs_ext
def test_extension_rejects_bad_inputs():
    from nova_rt._C_loader import load_extension

    ext = load_extension()
    a = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="shape"):
        ext.weighted_sum([a, torch.randn(5, 4)], [1.0, 1.0], 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="weights"):
        ext.weighted_sum([a, a], [1.0], 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.weighted_sum([a, torch.randn(5, 4).t()], [1.0, 1.0], 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="at least 2 models"):
        ext.model_stock(a, [a], 0, torch.float32)
    with pytest.raises(RuntimeError, match="fp32/fp16/bf16"):
        ext.weighted_sum([a.int()], [1.0], 1.0, torch.float32)
