"""Triton kernels with pure-PyTorch fallbacks.

Every public op takes impl="auto" | "triton" | "torch": "auto" runs Triton on CUDA tensors and PyTorch on CPU
tensors; "triton" on CPU tensors runs under Triton's interpreter. The interpreter must be chosen before any
`@triton.jit` decoration runs, so on a machine without CUDA this package sets TRITON_INTERPRET=1 at import
(unless the user set it); with CUDA present nothing is changed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Map "auto" to "triton" for CUDA tensors and "torch" otherwise; validate explicit choices."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if all(t.is_cuda for t in tensors if t is not None) else "torch"
