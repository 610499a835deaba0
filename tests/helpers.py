"""Tolerance helpers shared by the kernel and math tests."""

import torch


def assert_no_worse_than_eager(out, eager, oracle, factor: float = 2.0, name: str = "output") -> None:
    """flash-attention's rule: |out - oracle| <= factor * |eager - oracle| + floor, with a dtype-scaled floor.

    `oracle` is a float64 computation; `eager` is PyTorch in the same dtype as `out`.
    """
    out_d, eager_d, oracle_d = out.double(), eager.double(), oracle.double()
    assert out_d.shape == oracle_d.shape, f"{name}: shape {tuple(out_d.shape)} != {tuple(oracle_d.shape)}"
    assert torch.isfinite(out_d).all(), f"{name}: non-finite values"
    err = (out_d - oracle_d).abs().max().item() if out_d.numel() else 0.0
    err_eager = (eager_d - oracle_d).abs().max().item() if out_d.numel() else 0.0
    scale = oracle_d.abs().max().item() if out_d.numel() else 0.0
    floor = 4 * torch.finfo(out.dtype).eps * max(scale, 1.0) if out.dtype.is_floating_point else 0.0
    assert err <= factor * err_eager + floor, \
        f"{name}: kernel err {err:.3e} vs eager err {err_eager:.3e} (floor {floor:.1e})"


def assert_close_verbose(actual, expected, *, rtol: float, atol: float, name: str = "tensor") -> None:
    """allclose with a message that says how many elements differ, where, and by how much."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=False)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        diff = (a - e).abs()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} mismatched (rtol={rtol}, atol={atol}); "
            f"max abs diff {diff.max().item():.3e}; first at {idx}: "
            f"{[a[tuple(i)].item() for i in idx]} vs {[e[tuple(i)].item() for i in idx]}"
        )
