"""Pure-PyTorch merge ops: the fallback when nova_rt._C is unavailable, and the oracle the extension is tested against.

Same semantics as csrc/merge/ (and mergekit 0.1.5 where mergekit defines them), written with whole-tensor torch ops
so they share no code with the kernels. Compute dtype is fp32 (fp64 for fp64 inputs); outputs are cast to out_dtype.
Legend: N models (besides the base), tau_i = x_i - base (task vector), w_i weight, rho_i density.

- weighted_sum:  scale * sum_i w_i x_i                                               (linear merge)
- gta:           base + lambda * mix / div, mix over tau'_i = w_i * sparsify(tau_i)   (task arithmetic, TIES, DARE,
                 Breadcrumbs (magnitude band with outliers dropped), DELLA (rank-weighted random drop))
- slerp:         spherical interpolation a -> b by t over the flattened tensors; lerp when |cos| > dot_threshold.
- model_stock:   c = mean pairwise cos(tau_i, tau_j), t = N c / (1 + (N - 1) c), out = t * mean_i x_i + (1 - t) * base
                 (per row when filter_wise).

Sparsification, consensus, the divisor and where DARE differs from mergekit: docs/stages.md#merge-methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPARSIFY_NONE, SPARSIFY_MAGNITUDE, SPARSIFY_RANDOM = 0, 1, 2
SPARSIFY_OUTLIERS, SPARSIFY_DELLA = 3, 4  # PyTorch only (the extension knows 0-2); `rescale` means L1 matching
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class GtaParams:
    """Arguments of the generalized task-arithmetic op (one value per model for weights and densities)."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    sparsify: int = SPARSIFY_NONE
    consensus: bool = False
    normalize: bool = False
    lam: float = 1.0
    rescale: bool = False
    seed: int = 0
    tensor_id: int = 0
    gammas: tuple[float, ...] = ()  # SPARSIFY_OUTLIERS: share of the largest |delta| dropped, per model
    epsilons: tuple[float, ...] = ()  # SPARSIFY_DELLA: keep probabilities span density -/+ epsilon, per model


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum_ref(xs: list[torch.Tensor], weights: list[float], scale: float,
                     out_dtype: torch.dtype) -> torch.Tensor:
    acc = compute_dtype(xs[0].dtype)
    total = torch.zeros(xs[0].shape, dtype=acc, device=xs[0].device)
    for x, w in zip(xs, weights):
        total += torch.tensor(w, dtype=acc) * x.to(acc)
    return (total * torch.tensor(scale, dtype=acc)).to(out_dtype)


def magnitude_k(density: float, numel: int) -> int:
    """mergekit's kept count: all for density >= 1, none for <= 0, else max(1, int(density * numel))."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_mask_ref(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k largest |delta| (stable descending sort: equal magnitudes kept in index order)."""
    k = magnitude_k(density, delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if k > 0:
        order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(delta.shape)


def _splitmix64_int(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def dare_stream(seed: int, tensor_id: int, model: int) -> int:
    """The 64-bit stream key of (seed, tensor, model), as csrc/merge/merge.h dare_stream."""
    return _splitmix64_int(_splitmix64_int(_splitmix64_int(seed & _MASK64) ^ (tensor_id & _MASK64)) ^ model)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _splitmix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors holding uint64 bit patterns (add/mul wrap modulo 2^64)."""
    z = z + _signed(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def dare_uniform24(shape: torch.Size, seed: int, tensor_id: int, model: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Element e's 24-bit random integer (float64): splitmix64(stream + e) >> 40, stream = dare_stream(...)."""
    numel = math.prod(shape)
    stream = _signed(dare_stream(seed, tensor_id, model))
    counters = torch.arange(numel, dtype=torch.int64, device=device) + stream
    return _shr(_splitmix64_tensor(counters), 40).to(torch.float64).reshape(shape)


def dare_mask_ref(shape: torch.Size, density: float, seed: int, tensor_id: int, model: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep mask of DARE: element e kept iff (splitmix64(stream + e) >> 40) < density * 2^24."""
    return dare_uniform24(shape, seed, tensor_id, model, device) < density * 16777216.0


def outliers_mask_ref(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs (mergekit's magnitude_outliers): in ascending |delta| order (stable), keep int(density * n)
    elements after skipping the smallest max(0, n - int(density * n) - int(gamma * n)); all when density >= 1."""
    numel = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = max(0, int(density * numel))
    skip = max(0, numel - keep - int(gamma * numel))
    return rank_range_mask(delta.abs().reshape(-1), skip, skip + keep).reshape(delta.shape)


def rank_range_mask(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the 1-D `values` at positions [start, stop) of a stable ascending sort (equal values in index order),
    by selecting the two boundary values (O(n)) instead of sorting."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    start, stop = max(start, 0), min(stop, values.numel())
    if stop <= start:
        return mask
    if torch.isnan(values).any():  # no order statistic to select by: the sort's order
        mask[torch.sort(values, stable=True).indices[start:stop]] = True
        return mask
    low, high = torch.kthvalue(values, start + 1).values, torch.kthvalue(values, stop).values
    mask = (values > low) & (values < high)
    for boundary in ((low,) if bool(low == high) else (low, high)):
        ties = torch.nonzero(values == boundary).reshape(-1)  # ascending positions first, first + 1, ...
        first = int((values < boundary).sum())
        mask[ties[max(start - first, 0):max(stop - first, 0)]] = True
    return mask


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability (float64): density - epsilon + 2 epsilon (rank - 1) / (n - 1), rank of |delta| in its
    row along dim 1 (1-D tensors: one row; stable order on ties; a row of one element: density)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    length = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    positions = torch.arange(length, device=delta.device).reshape(1, length, *([1] * (rows.dim() - 2)))
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order)).to(torch.float64)  # inverse perm
    spread = ranks / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + spread * (2 * epsilon)).reshape(delta.shape)


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """kept * sum|delta| / sum|kept| (mergekit's rescale for magnitude_outliers / della_magprune); kept as is when
    either sum is below eps."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _sparsify_extra(delta: torch.Tensor, i: int, params: GtaParams) -> torch.Tensor:
    density = params.densities[i]
    if density >= 1:
        return delta
    if params.sparsify == SPARSIFY_OUTLIERS:
        mask = outliers_mask_ref(delta, density, params.gammas[i])
    elif density <= 0:
        return torch.zeros_like(delta)
    else:
        probs = della_keep_prob(delta, density, params.epsilons[i])
        mask = dare_uniform24(delta.shape, params.seed, params.tensor_id, i, delta.device) < probs * 16777216.0
    kept = torch.where(mask, delta, torch.zeros_like(delta))
    return l1_rescaled(delta, kept) if params.rescale else kept


def _sparsify(delta: torch.Tensor, i: int, params: GtaParams) -> torch.Tensor:
    density = params.densities[i]
    if params.sparsify in (SPARSIFY_OUTLIERS, SPARSIFY_DELLA):
        return _sparsify_extra(delta, i, params)
    if params.sparsify == SPARSIFY_MAGNITUDE:
        return torch.where(magnitude_mask_ref(delta, density), delta, torch.zeros_like(delta))
    if params.sparsify == SPARSIFY_RANDOM:
        mask = dare_mask_ref(delta.shape, density, params.seed, params.tensor_id, i, delta.device)
        scale = 1.0 / density if (params.rescale and 0 < density < 1) else 1.0
        return torch.where(mask, delta * torch.tensor(scale, dtype=torch.float32).to(delta.dtype), 0)
    return delta


def gta_ref(base: torch.Tensor, xs: list[torch.Tensor], p: GtaParams, out_dtype: torch.dtype) -> torch.Tensor:
    acc = compute_dtype(base.dtype)
    base_acc = base.to(acc)
    weights = torch.tensor(p.weights, dtype=acc, device=base.device).reshape(-1, *([1] * base.dim()))
    deltas = torch.stack([_sparsify(x.to(acc) - base_acc, i, p) for i, x in enumerate(xs)]) * weights
    if p.consensus:
        majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(acc)
        agree = deltas.sign() == majority
        mix = torch.where(agree, deltas, 0).sum(dim=0)
        div = torch.where(agree, weights, 0).sum(dim=0)
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mix = deltas.sum(dim=0)
        wsum = sum(p.weights)
        div = torch.tensor(1.0 if abs(wsum) < 1e-8 else wsum, dtype=acc)
    if p.normalize:
        mix = mix / div
    return (base_acc + mix * torch.tensor(p.lam, dtype=acc)).to(out_dtype)


def slerp_ref(a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype, dot_threshold: float = 0.9995,
              eps: float = 1e-8) -> torch.Tensor:
    acc = compute_dtype(a.dtype)
    x, y = a.to(acc).reshape(-1), b.to(acc).reshape(-1)
    norm_a, norm_b = torch.linalg.vector_norm(x).item(), torch.linalg.vector_norm(y).item()
    norm_a, norm_b = (norm_a if norm_a > eps else 1.0), (norm_b if norm_b > eps else 1.0)
    dot = min(1.0, max(-1.0, torch.dot(x / norm_a, y / norm_b).item()))
    if abs(dot) > dot_threshold:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        coef_a, coef_b = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (coef_a * x + coef_b * y).reshape(a.shape).to(out_dtype)


def model_stock_rows(shape: torch.Size, filter_wise: bool) -> int:
    """Row length of the Model Stock statistics: last dim when filter_wise on a >= 2-D tensor, else all elements."""
    numel = math.prod(shape)
    return shape[-1] if (filter_wise and len(shape) >= 2) else numel


def model_stock_ref(base: torch.Tensor, xs: list[torch.Tensor], row_len: int, out_dtype: torch.dtype) -> torch.Tensor:
    if len(xs) < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {len(xs)}")
    acc = compute_dtype(base.dtype)
    cols = row_len if row_len > 0 else max(base.numel(), 1)
    base_rows = base.to(acc).reshape(-1, cols)
    model_rows = [x.to(acc).reshape(-1, cols) for x in xs]
    offsets = [w - base_rows for w in model_rows]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            dots = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dots / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(model_rows)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))
    mean = torch.stack(model_rows).sum(dim=0) / n
    return (t * mean + (1 - t) * base_rows).reshape(base.shape).to(out_dtype)
