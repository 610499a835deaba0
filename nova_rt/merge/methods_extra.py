"""Merge methods nearswap, nuslerp, multislerp, sce, karcher (math: reference_extra.py).

Names, parameters and defaults are mergekit 0.1.5's. nearswap runs nova_rt._C's CPU kernel when it can (ops_extra.py);
the others only PyTorch: `--impl ext` is an error for them, `auto` and `torch` run the same code. methods.py imports
this module, so importing it registers the methods. nuslerp and
multislerp take an optional base_model (task vectors are interpolated when it is given); karcher takes none (list
every model under `models`).
"""

from __future__ import annotations

import torch

from nova_rt.errors import MergeConfigError
from nova_rt.merge import ops_extra
from nova_rt.merge.reference_extra import karcher_ref, multislerp_ref, nuslerp_ref, sce_ref
from nova_rt.merge.registry import REQUIRED, ParamSpec, TensorMerge, register_merge

_INT8_MASK = ParamSpec(bool, False, choices=(False,), why="int8_mask only changes mergekit's mask dtype; use false")


def torch_only(m: TensorMerge, method: str) -> None:
    """MergeConfigError for `--impl ext` on a method that has only the PyTorch implementation."""
    if m.impl == "ext":
        raise MergeConfigError(f"merge method {method!r} has no C++ kernel (PyTorch only); use --impl auto or torch")


def _into(m: TensorMerge, result: torch.Tensor) -> torch.Tensor:
    return result if m.out is None else m.out.copy_(result)


@register_merge("nearswap", needs_base=True, min_models=1, max_models=1,
                global_params={"t": ParamSpec(float, REQUIRED)},
                reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
                description="the model where it lies within t of the base, moving linearly to the base beyond")
def nearswap(m: TensorMerge) -> torch.Tensor:
    return ops_extra.nearswap(m.base, m.tensors[0], m.params["t"], out_dtype=m.out_dtype, impl=m.impl, out=m.out)


@register_merge("nuslerp", needs_base=True, optional_base=True, min_models=2, max_models=2,
                global_params={"nuslerp_row_wise": ParamSpec(bool, False), "nuslerp_flatten": ParamSpec(bool, True)},
                model_params={"weight": ParamSpec(float, REQUIRED)},
                description="SLERP of two models (or task vectors) by t = w2 / (w1 + w2), whole tensor, per row "
                            "or per column")
def nuslerp(m: TensorMerge) -> torch.Tensor:
    torch_only(m, "nuslerp")
    weights = [p["weight"] for p in m.model_params]
    return _into(m, nuslerp_ref(m.base, m.tensors, weights, m.params["nuslerp_row_wise"],
                                m.params["nuslerp_flatten"], m.out_dtype))


@register_merge("multislerp", needs_base=True, optional_base=True, min_models=1,
                global_params={"normalize_weights": ParamSpec(bool, True), "eps": ParamSpec(float, 1e-8)},
                model_params={"weight": ParamSpec(float, REQUIRED)},
                reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
                description="weighted spherical barycentre of any number of models (or task vectors)")
def multislerp(m: TensorMerge) -> torch.Tensor:
    torch_only(m, "multislerp")
    weights = [p["weight"] for p in m.model_params]
    if m.params["normalize_weights"] and len(weights) > 1 and sum(weights) == 0:
        raise MergeConfigError(f"multislerp: weights {weights} sum to 0; normalize_weights divides by it")
    try:
        result = multislerp_ref(m.base, m.tensors, weights, m.params["normalize_weights"], m.params["eps"],
                                m.out_dtype, m.name)
    except ValueError as exc:
        raise MergeConfigError(str(exc)) from None
    return _into(m, result)


@register_merge("sce", needs_base=True, min_models=1,
                global_params={"select_topk": ParamSpec(float, 1.0), "int8_mask": _INT8_MASK},
                reference_url="https://arxiv.org/abs/2408.07990",
                description="keep the select_topk highest-variance elements, TIES signs, mean-square weights")
def sce(m: TensorMerge) -> torch.Tensor:
    torch_only(m, "sce")
    return _into(m, sce_ref(m.base, m.tensors, m.params["select_topk"], m.out_dtype))


@register_merge("karcher", needs_base=False, min_models=1,
                global_params={"max_iter": ParamSpec(int, 10), "tol": ParamSpec(float, 1e-5)},
                reference_url="https://arxiv.org/abs/2603.04972",
                description="Karcher (Riemannian) mean of the models on the sphere, scaled by their mean norm")
def karcher(m: TensorMerge) -> torch.Tensor:
    torch_only(m, "karcher")
    if m.params["max_iter"] < 0 or m.params["tol"] < 0:
        raise MergeConfigError(f"karcher: max_iter {m.params['max_iter']} and tol {m.params['tol']} must be >= 0")
    return _into(m, karcher_ref(m.tensors, m.params["max_iter"], m.params["tol"], m.out_dtype))
