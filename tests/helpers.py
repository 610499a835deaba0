"""Tolerance helpers shared by the kernel and math tests."""

import torch


def assert_no_worse_than_eager(out, eager, oracle, factor: float = 2.0, name: str = "output",
                               reduce_len: int = 1) -> None:
    """flash-attention's rule: |out - oracle| <= factor * |eager - oracle| + floor, with a dtype-scaled floor.

    `oracle` is a float64 computation; `eager` is PyTorch in the same dtype as `out`. `reduce_len`: the length of
    the sums behind each output element (a gradient's GEMM over the vocab, say), which accumulate in fp32. Floor =
    4 |oracle|max (eps_out + eps_fp32 sqrt(reduce_len)): rounding the output, plus fp32 accumulation rounding that
    grows like a random walk. Without the second term a max-error ratio of two fp32 results that differ only in
    summation order fails a few runs in a hundred (both errors ~1e-6, far below any bug).
    """
    out_d, eager_d, oracle_d = out.double(), eager.double(), oracle.double()
    assert out_d.shape == oracle_d.shape, f"{name}: shape {tuple(out_d.shape)} != {tuple(oracle_d.shape)}"
    assert torch.isfinite(out_d).all(), f"{name}: non-finite values"
    err = (out_d - oracle_d).abs().max().item() if out_d.numel() else 0.0
    err_eager = (eager_d - oracle_d).abs().max().item() if out_d.numel() else 0.0
    scale = oracle_d.abs().max().item() if out_d.numel() else 0.0
    eps_acc = torch.finfo(torch.float32).eps * reduce_len ** 0.5 if reduce_len > 1 else 0.0
    floor = 4 * (torch.finfo(out.dtype).eps + eps_acc) * max(scale, 1.0) if out.dtype.is_floating_point else 0.0
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
