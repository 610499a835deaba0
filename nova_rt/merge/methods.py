"""The merge methods nova-rt supports, in mergekit's names and parameter conventions (mergekit 0.1.5).

Each function merges one tensor (a TensorMerge) through nova_rt.merge.ops. Parameters and defaults follow mergekit:
linear normalises by default; task_arithmetic does not; ties normalises; dare_* rescale kept deltas. Options that
mergekit has but nova-rt does not implement are declared with the single value we support, so a config asking for
anything else fails instead of being silently ignored (int8_mask only changes mergekit's mask dtype, so only false
is accepted; rescale on ties/task_arithmetic means L1-norm matching in mergekit, which is not implemented there).
breadcrumbs*, della* run only in PyTorch (reference.gta_ref; --impl ext is an error) and rescale by L1 as mergekit.

Unlike mergekit, weights that nearly cancel under `normalize` are an error (MergeConfigError, exit 2): normalising
divides by their sum, so 1 and -0.999 would scale the model x1000. The limit is MAX_NORMALIZE_GAIN: no weight may
exceed that many times the |sum| it is divided by (for ties, any subset of the weights, since its divisor per
element is the sum over the models that agree in sign).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from functools import lru_cache

import torch

import nova_rt.merge.methods_agents  # noqa: F401 - registers arcee_fusion, ram, ramplus_tl
from nova_rt.errors import MergeConfigError
from nova_rt.merge import ops
from nova_rt.merge.methods_extra import torch_only  # importing it registers nearswap, nuslerp, multislerp, ...
from nova_rt.merge.reference import (
    SPARSIFY_DELLA,
    SPARSIFY_MAGNITUDE,
    SPARSIFY_NONE,
    SPARSIFY_OUTLIERS,
    SPARSIFY_RANDOM,
    GtaParams,
    gta_ref,
    model_stock_rows,
)
from nova_rt.merge.registry import REQUIRED, ParamSpec, TensorMerge, register_merge

MAX_NORMALIZE_GAIN = 10.0


@lru_cache(maxsize=256)
def check_normalizer(method: str, weights: tuple[float, ...], subsets: bool) -> None:
    """MergeConfigError when normalising by a sum of `weights` (any subset if `subsets`) would amplify a weight
    more than MAX_NORMALIZE_GAIN times (the weights nearly cancel)."""
    sizes = range(1, len(weights) + 1) if subsets and len(weights) <= 12 else [len(weights)]
    for k in sizes:
        for group in itertools.combinations(weights, k):
            total = sum(group)
            biggest = max(abs(w) for w in group)
            if total != 0 and biggest > MAX_NORMALIZE_GAIN * abs(total):
                raise MergeConfigError(
                    f"{method}: weights {list(group)} sum to {total:.6g}; normalize divides by it, which would scale "
                    f"the merged tensors x{biggest / abs(total):.4g} (they nearly cancel). Fix the weights, or set "
                    "`normalize: false` if you mean an unnormalised sum")


_INT8_MASK = ParamSpec(bool, False, choices=(False,), why="int8_mask only changes mergekit's mask dtype; use false")
_NO_RESCALE = ParamSpec(bool, False, choices=(False,), why="L1-norm rescaling of pruned deltas is not implemented")


def tensor_id(name: str) -> int:
    """Stable 63-bit id of a tensor name (DARE's RNG counter space), independent of tensor order and process."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


@register_merge("linear", needs_base=False, min_models=1,
                global_params={"normalize": ParamSpec(bool, True)},
                model_params={"weight": ParamSpec(float, REQUIRED)},
                reference_url="https://arxiv.org/abs/2203.05482",
                description="weighted average of the models (sum when normalize is false)")
def linear(m: TensorMerge) -> torch.Tensor:
    weights, scale = linear_weights(m)
    return ops.weighted_sum(m.tensors, weights, scale, out_dtype=m.out_dtype, impl=m.impl, out=m.out)


def linear_weights(m: TensorMerge) -> tuple[list[float], float]:
    """linear's (weights, scale) for one tensor (only its parameters are read: also used by the blocked path)."""
    weights = [p["weight"] for p in m.model_params]
    scale = 1.0
    if m.params["normalize"]:
        total = sum(weights)
        if total == 0:
            raise ValueError(f"linear merge of {m.name!r}: weights sum to 0, cannot normalize")
        check_normalizer("linear", tuple(weights), False)
        scale = 1.0 / total
    return weights, scale


# Methods whose C++ op merges a tensor in row blocks exactly (nova_rt.merge.blocked): name -> how. Every other
# method merges each tensor whole (model_stock's statistics, breadcrumbs / della / nearswap / RAM and the other
# PyTorch-only methods).
BLOCKED_KINDS: dict[str, str] = {"linear": "linear", "slerp": "slerp"}
GTA_PARAMS: dict[str, Callable[[TensorMerge], GtaParams]] = {}  # method -> GtaParams of a tensor's parameters


def _check_extra_sparsify(name: str, m: TensorMerge) -> None:
    """Breadcrumbs' gamma in [0, 1]; DELLA's density -/+ epsilon inside (0, 1) (mergekit's rule)."""
    for index, p in enumerate(m.model_params):
        where = f"{name}: tensor {m.name!r}, model {index + 1} besides the base"
        if "gamma" in p and not 0 <= p["gamma"] <= 1:
            raise MergeConfigError(f"{where}: gamma = {p['gamma']} must be in [0, 1]")
        if "epsilon" in p and 0 < p["density"] < 1 and not (p["epsilon"] >= 0 and 0 < p["density"] - p["epsilon"]
                                                              and p["density"] + p["epsilon"] < 1):
            raise MergeConfigError(f"{where}: density {p['density']} -/+ epsilon {p['epsilon']} must stay inside "
                                   "(0, 1)")


def _gta_method(name: str, *, sparsify: int, consensus: bool, normalize: bool, rescale: bool, url: str,
                description: str) -> None:
    model_params = {"weight": ParamSpec(float, REQUIRED)}
    if sparsify != SPARSIFY_NONE:
        model_params["density"] = ParamSpec(float, 1.0)
    if sparsify == SPARSIFY_OUTLIERS:
        model_params["gamma"] = ParamSpec(float, 0.01)
    if sparsify == SPARSIFY_DELLA:
        model_params["epsilon"] = ParamSpec(float, 0.15)
    torch_path = sparsify in (SPARSIFY_OUTLIERS, SPARSIFY_DELLA)
    global_params = {
        "normalize": ParamSpec(bool, normalize),
        "lambda": ParamSpec(float, 1.0),
        "int8_mask": _INT8_MASK,
        "rescale": ParamSpec(bool, rescale) if sparsify == SPARSIFY_RANDOM or torch_path else _NO_RESCALE,
    }

    def gta_params(m: TensorMerge) -> GtaParams:
        if m.params["normalize"]:
            check_normalizer(name, tuple(p["weight"] for p in m.model_params), True)
        return GtaParams(
            weights=tuple(p["weight"] for p in m.model_params),
            densities=tuple(p.get("density", 1.0) for p in m.model_params),
            sparsify=sparsify, consensus=consensus, normalize=m.params["normalize"], lam=m.params["lambda"],
            rescale=m.params["rescale"], seed=m.seed, tensor_id=tensor_id(m.name),
            gammas=tuple(p.get("gamma", 0.0) for p in m.model_params),
            epsilons=tuple(p.get("epsilon", 0.0) for p in m.model_params),
        )

    def merge(m: TensorMerge) -> torch.Tensor:
        params = gta_params(m)
        if torch_path:
            torch_only(m, name)
            _check_extra_sparsify(name, m)
            result = gta_ref(m.base, m.tensors, params, m.out_dtype)
            return result if m.out is None else m.out.copy_(result)
        return ops.gta(m.base, m.tensors, params, out_dtype=m.out_dtype, impl=m.impl, out=m.out)

    merge.__name__ = merge.__qualname__ = name
    if not torch_path:
        BLOCKED_KINDS[name] = "gta"
        GTA_PARAMS[name] = gta_params
    register_merge(name, needs_base=True, min_models=1, global_params=global_params, model_params=model_params,
                   reference_url=url, description=description)(merge)


_gta_method("task_arithmetic", sparsify=SPARSIFY_NONE, consensus=False, normalize=False, rescale=False,
            url="https://arxiv.org/abs/2212.04089",
            description="base + lambda * sum of weighted task vectors")
_gta_method("ties", sparsify=SPARSIFY_MAGNITUDE, consensus=True, normalize=True, rescale=False,
            url="https://arxiv.org/abs/2306.01708",
            description="task arithmetic on the top-density |delta| of each model, signs elected by the weighted sum")
_gta_method("dare_linear", sparsify=SPARSIFY_RANDOM, consensus=False, normalize=False, rescale=True,
            url="https://arxiv.org/abs/2311.03099",
            description="task arithmetic on random keep-density subsets rescaled by 1/density")
_gta_method("dare_ties", sparsify=SPARSIFY_RANDOM, consensus=True, normalize=False, rescale=True,
            url="https://arxiv.org/abs/2311.03099",
            description="dare_linear with TIES sign election")
# PyTorch only (reference.gta_ref); `rescale` is mergekit's L1-norm matching of each pruned task vector.
_gta_method("breadcrumbs", sparsify=SPARSIFY_OUTLIERS, consensus=False, normalize=False, rescale=False,
            url="https://arxiv.org/abs/2312.06795",
            description="task arithmetic keeping a density band of |delta| below the gamma share of outliers")
_gta_method("breadcrumbs_ties", sparsify=SPARSIFY_OUTLIERS, consensus=True, normalize=False, rescale=False,
            url="https://arxiv.org/abs/2312.06795",
            description="breadcrumbs with TIES sign election")
_gta_method("della", sparsify=SPARSIFY_DELLA, consensus=True, normalize=True, rescale=True,
            url="https://arxiv.org/abs/2406.11617",
            description="TIES on random subsets kept with probability density -/+ epsilon rising with |delta| rank")
_gta_method("della_linear", sparsify=SPARSIFY_DELLA, consensus=False, normalize=False, rescale=True,
            url="https://arxiv.org/abs/2406.11617",
            description="della without sign election or normalisation")


@register_merge("slerp", needs_base=True, min_models=1, max_models=1,
                global_params={"t": ParamSpec(float, REQUIRED)},
                reference_url="https://en.wikipedia.org/wiki/Slerp",
                description="spherical interpolation from the base (t = 0) to the other model (t = 1)")
def slerp(m: TensorMerge) -> torch.Tensor:
    return ops.slerp(m.base, m.tensors[0], m.params["t"], out_dtype=m.out_dtype, impl=m.impl, out=m.out)


@register_merge("model_stock", needs_base=True, min_models=2,
                global_params={"filter_wise": ParamSpec(bool, False)},
                reference_url="https://arxiv.org/abs/2403.19522",
                description="average of the models pulled towards the base by their task vectors' mean cosine")
def model_stock(m: TensorMerge) -> torch.Tensor:
    row_len = model_stock_rows(m.base.shape, m.params["filter_wise"])
    return ops.model_stock(m.base, m.tensors, row_len, out_dtype=m.out_dtype, impl=m.impl, out=m.out)
