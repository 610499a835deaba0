"""PyTorch math of the merge methods without a C++ kernel (mergekit 0.1.5 semantics; methods_extra.py registers them).

Compute dtype as reference.py (fp32, fp64 for fp64 inputs); outputs cast to out_dtype. Legend as reference.py.

- nearswap:   w = clamp(t / max(|base - x|, 1e-6), 0, 1), out = w x + (1 - w) base      (take x where it is near)
- nuslerp:    slerp x_0 -> x_1 by t = w_1 / (w_0 + w_1) (0.5 when the sum is ~0), over the flattened tensor, each
              row (last dim) or each column; of the task vectors when there is a base. Coefficients from the
              angle between the unit vectors, applied to the raw vectors; lerp when exactly colinear.
- multislerp: barycentric interpolation on the sphere: unit vectors' weighted mean m, tangent t = sum_i w_i
              (u_i - (u_i.m) m), out = |avg| (m cos|t| + t sin|t| / |t|), |avg| = sum_i w_i |x_i| (task vectors
              with a base; one model: that model; all zero: zero).
- sce:        keep the select_topk share of elements with the largest variance across models, TIES sign consensus,
              mean square of each task vector as its weight: base + sum_i c_i tau_i / max(sum_i c_i, 1e-6).
- karcher:    Riemannian (Karcher) mean of the unit tensors by fixed-point iteration, scaled by the mean norm.
"""

from __future__ import annotations

import torch

from nova_rt.merge.reference import compute_dtype


def nearswap_ref(base: torch.Tensor, x: torch.Tensor, t: float, out_dtype: torch.dtype) -> torch.Tensor:
    acc = compute_dtype(base.dtype)
    a, b = base.to(acc), x.to(acc)
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return (weight * b + (1 - weight) * a).to(out_dtype)


def _nuslerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Slerp of each row (last dim) of v0 towards v1 by t."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    return torch.where(colinear, (1 - t) * v0 + t * v1, curved)


def nuslerp_ref(base: torch.Tensor | None, xs: list[torch.Tensor], weights: list[float], row_wise: bool,
                flatten: bool, out_dtype: torch.dtype) -> torch.Tensor:
    acc = compute_dtype(xs[0].dtype)
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    b = base.to(acc) if base is not None else None
    v0, v1 = (x.to(acc) - b if b is not None else x.to(acc) for x in xs)
    if flatten:
        result = _nuslerp_rows(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    elif row_wise:
        result = _nuslerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        result = _nuslerp_rows(t, v0, v1)
    return (result if b is None else b + result).to(out_dtype)


def multislerp_ref(base: torch.Tensor | None, xs: list[torch.Tensor], weights: list[float], normalize: bool,
                   eps: float, out_dtype: torch.dtype, name: str = "") -> torch.Tensor:
    acc = compute_dtype(xs[0].dtype)
    if len(xs) == 1:
        return xs[0].to(out_dtype)
    b = base.to(acc).reshape(-1) if base is not None else None
    flat = torch.stack([x.to(acc).reshape(-1) - b if b is not None else x.to(acc).reshape(-1) for x in xs])
    w = torch.tensor(weights, dtype=acc, device=flat.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps and not norms.any():  # all zero (mergekit raises for > 2 models): the base
        result = torch.zeros_like(flat[0])
    elif mean_norm < eps:
        if len(xs) != 2:
            raise ValueError(f"multislerp of {name!r}: the weighted mean of the unit tensors is zero (antipodal "
                             "tensors whose weights cancel); change the weights")
        result = flat[0] * w[0] + flat[1] * w[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean
        tangent = (tangents * w[:, None]).sum(dim=0)
        length = torch.linalg.vector_norm(tangent) + eps
        result = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms[:, 0] * w).sum()
    if b is not None:
        result = result + b
    return result.reshape(xs[0].shape).to(out_dtype)


def top_count_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` largest of 1-D `values`, equal values taken in index order (a stable descending sort's
    first `count`), by selection (O(n)) instead of a sort."""
    numel = values.numel()
    if count <= 0 or numel == 0:
        return torch.zeros(numel, dtype=torch.bool, device=values.device)
    if count >= numel:
        return torch.ones(numel, dtype=torch.bool, device=values.device)
    if torch.isnan(values).any():  # no order statistic to select by: the sort's order
        keep = torch.zeros(numel, dtype=torch.bool, device=values.device)
        keep[torch.sort(values, descending=True, stable=True).indices[:count]] = True
        return keep
    threshold = torch.kthvalue(values, numel - count + 1).values  # the count-th largest
    keep = values > threshold
    ties = torch.nonzero(values == threshold).reshape(-1)
    keep[ties[:count - int(keep.sum())]] = True
    return keep


def sce_ref(base: torch.Tensor, xs: list[torch.Tensor], select_topk: float, out_dtype: torch.dtype) -> torch.Tensor:
    acc = compute_dtype(base.dtype)
    b = base.to(acc)
    tvs = torch.stack([x.to(acc) - b for x in xs])
    if select_topk < 1:
        keep = torch.zeros(b.numel(), dtype=torch.bool, device=b.device)
        if select_topk > 0:
            var = tvs.var(dim=0, unbiased=False).reshape(-1)
            count = int(int(torch.count_nonzero(var)) * select_topk)
            keep = top_count_mask(var, count)
        tvs = tvs * keep.reshape(b.shape).to(acc)
    majority = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0).to(acc)
    agree = (tvs.sign() == majority).to(acc)
    power = tvs.square().reshape(len(xs), -1).mean(dim=1)
    total = power.sum().item()
    weights = power / total if abs(total) >= 1e-6 else torch.full_like(power, 1 / len(xs))
    erased = weights.reshape(-1, *([1] * b.dim())) * agree
    return (b + (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)).to(out_dtype)


def karcher_ref(xs: list[torch.Tensor], max_iter: int, tol: float, out_dtype: torch.dtype) -> torch.Tensor:
    if len(xs) == 1:
        return xs[0].to(out_dtype)
    acc = compute_dtype(xs[0].dtype)
    flat = [x.to(acc).reshape(-1) for x in xs]
    norms = [torch.linalg.vector_norm(f) for f in flat]
    units = [f / n for f, n in zip(flat, norms) if n.item() > tol]  # ~zero tensors do not pull the direction
    if not units:
        return torch.zeros_like(xs[0], dtype=out_dtype)
    alphas = [1.0 / len(units)] * len(units)
    mean = sum(a * u for a, u in zip(alphas, units))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            dot = torch.dot(mean, unit).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    scale = sum(norms) / len(xs)
    return (scale * mean).reshape(xs[0].shape).to(out_dtype)

