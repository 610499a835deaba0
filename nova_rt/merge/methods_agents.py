"""Merge methods arcee_fusion, ram and ramplus_tl (mergekit 0.1.5's names, parameters and defaults).

The math is in reference_agents.py. ram and ramplus_tl (RAM / RAM+, arXiv 2601.13572, for merging RL-trained
agents of one base) need nothing beyond the weights: base_model is the shared model the agents were trained from,
`models` the agents, and the per-tensor statistics come from the task vectors themselves. ramplus_tl is mergekit's
tensor-local RAM+ (overlap ratio per tensor, not over the whole model). Both, and nearswap, run the C++ kernels of
nova_rt._C on CPU tensors when it has them (ops_extra.py); arcee_fusion is PyTorch only.
"""

from __future__ import annotations

import torch

from nova_rt.errors import MergeConfigError
from nova_rt.merge import ops_extra
from nova_rt.merge.methods_extra import torch_only
from nova_rt.merge.reference_agents import arcee_fusion_ref
from nova_rt.merge.registry import ParamSpec, TensorMerge, register_merge

_RAM_URL = "https://arxiv.org/abs/2601.13572"


@register_merge("arcee_fusion", needs_base=True, min_models=1, max_models=1, reference_url="https://arcee.ai",
                description="the model's changes whose |delta| x row KL(softmax) is an upper outlier (>= median + "
                            "1.5 IQR), else the base")
def arcee_fusion(m: TensorMerge) -> torch.Tensor:
    torch_only(m, "arcee_fusion")
    result = arcee_fusion_ref(m.base, m.tensors[0], m.out_dtype)
    return result if m.out is None else m.out.copy_(result)


def _epsilon(m: TensorMerge, method: str) -> float:
    epsilon = m.params["epsilon"]
    if epsilon < 0:
        raise MergeConfigError(f"{method}: epsilon = {epsilon} must be >= 0 (|delta| <= epsilon counts as unchanged)")
    return epsilon


@register_merge("ram", needs_base=True, min_models=1, global_params={"epsilon": ParamSpec(float, 1e-5)},
                reference_url=_RAM_URL,
                description="RL agents: each changed element (|delta| > epsilon) from the one agent that changed "
                            "it, the mean where several did")
def ram(m: TensorMerge) -> torch.Tensor:
    return ops_extra.ram(m.base, m.tensors, _epsilon(m, "ram"), out_dtype=m.out_dtype, impl=m.impl, out=m.out)


@register_merge("ramplus_tl", needs_base=True, min_models=1,
                global_params={"r": ParamSpec(float, 0.1), "alpha": ParamSpec(float, 0.2),
                               "epsilon": ParamSpec(float, 1e-5)},
                reference_url=_RAM_URL,
                description="ram with each agent's unique changes scaled by 1 + r min(alpha, shared/unique) per "
                            "tensor (RAM+)")
def ramplus_tl(m: TensorMerge) -> torch.Tensor:
    return ops_extra.ram(m.base, m.tensors, _epsilon(m, "ramplus_tl"), plus=(m.params["r"], m.params["alpha"]),
                          out_dtype=m.out_dtype, impl=m.impl, out=m.out)
