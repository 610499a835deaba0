"""PyTorch math of arcee_fusion, ram and ramplus_tl (mergekit 0.1.5 semantics; methods_agents.py registers them).

Compute dtype as reference.py (fp32, fp64 for fp64 inputs); outputs cast to out_dtype. tau_i = x_i - base.

- arcee_fusion: importance = |tau| * KL(softmax(x) + 1e-8 || softmax(base) + 1e-8) per row (last dim); keep tau
                where importance >= median + 1.5 (q3 - q1), the order statistics of importance at floor(q (n - 1))
                for q = 1/4, 1/2, 3/4: out = base + tau * keep. (mergekit samples 1M elements with replacement from
                torch's global RNG for larger tensors; here they are exact over all elements, so reproducible.)
- ram:          tau_i counts where |tau_i| > epsilon; c = how many models count at an element; out = base +
                tau_i of the one model where c = 1, the mean of the counting tau_i where c > 1, base where c = 0.
- ramplus_tl:   as ram with each model's unique part scaled by 1 + r min(alpha, rho_i), rho_i = (its counted
                elements with c > 1) / (those with c = 1) over this tensor (mergekit's tensor-local RAM+).
"""

from __future__ import annotations

import torch

from nova_rt.merge.reference import compute_dtype


def fusion_importance(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|x - base| times the per-row KL divergence of x's softmax from the base's (both + 1e-8), compute dtype."""
    acc = compute_dtype(base.dtype)
    b, y = base.to(acc), x.to(acc)
    p = torch.softmax(y, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (y - b).abs() * divergence


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1) of importance; quantile q is the order statistic at floor(q (n - 1)) (0-based)."""
    flat = importance.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (torch.kthvalue(flat, index + 1).values for index in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


def arcee_fusion_ref(base: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    acc = compute_dtype(base.dtype)
    importance = fusion_importance(base, x)
    keep = (importance >= fusion_threshold(importance)).to(acc)
    b = base.to(acc)
    return (b + (x.to(acc) - b) * keep).to(out_dtype)


def ram_counts(base: torch.Tensor, xs: list[torch.Tensor], epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(task vectors stacked in compute dtype, how many |tau_i| > epsilon at each element)."""
    acc = compute_dtype(base.dtype)
    b = base.to(acc)
    tvs = torch.stack([x.to(acc) - b for x in xs])
    return tvs, (tvs.abs() > epsilon).sum(dim=0)


def ramplus_scale(shared: int, unique: int, r: float, alpha: float) -> float:
    """RAM+'s factor of one model's unique elements: 1 + r * clamp(shared / unique, 0, alpha). A model with no unique
    element gets 1 + r * alpha when it shares any (mergekit divides by max(unique, epsilon)), else 1: it multiplies
    nothing either way."""
    rho = shared / unique if unique else (float("inf") if shared else 0.0)
    return 1.0 + r * min(max(rho, 0.0), alpha)


def ramplus_scales(tvs: torch.Tensor, counts: torch.Tensor, epsilon: float, r: float, alpha: float) -> list[float]:
    """ramplus_scale of each model, counted over this tensor."""
    scales = []
    for tv in tvs:
        counted = tv.abs() > epsilon
        scales.append(ramplus_scale(int((counted & (counts > 1)).sum()), int((counted & (counts == 1)).sum()),
                                    r, alpha))
    return scales


def ram_ref(base: torch.Tensor, xs: list[torch.Tensor], epsilon: float, out_dtype: torch.dtype,
            plus: tuple[float, float] | None = None) -> torch.Tensor:
    """RAM; RAM+ (tensor-local) when plus = (r, alpha)."""
    tvs, counts = ram_counts(base, xs, epsilon)
    scales = ramplus_scales(tvs, counts, epsilon, *plus) if plus else [1.0] * len(xs)
    merged = torch.zeros_like(tvs[0])
    for tv, scale in zip(tvs, scales):
        counted = tv.abs() > epsilon
        unique = tv * scale if plus else tv
        merged += torch.where(counted & (counts == 1), unique, torch.where(counted & (counts > 1), tv / counts, 0))
    return (base.to(tvs.dtype) + merged).to(out_dtype)
