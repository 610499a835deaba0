"""nearswap and RAM / RAM+ with the C++ kernels of nova_rt._C (csrc/merge/extra_cpu.cpp) or PyTorch, as ops.py.

The kernels run CPU tensors only: impl="auto" takes them for CPU tensors when the loaded extension has them, else
the PyTorch code of reference_extra.py / reference_agents.py (which they equal bit for bit); "ext" insists on them
(ExtensionUnavailable otherwise, e.g. for CUDA tensors); "torch" forces PyTorch.
"""

from __future__ import annotations

import torch

from nova_rt._C_loader import ExtensionUnavailable
from nova_rt.merge.ops import _extension_for
from nova_rt.merge.reference_agents import ram_ref, ramplus_scale
from nova_rt.merge.reference_extra import nearswap_ref


def _kernel(impl: str, tensors: list[torch.Tensor], name: str):
    """The extension's op `name` when it should run these tensors, else None (PyTorch)."""
    ext = _extension_for(impl, tensors)
    supported = ext is not None and tensors[0].is_cpu and hasattr(ext, name)
    if not supported and impl == "ext":
        raise ExtensionUnavailable(f"nova_rt._C has no CPU kernel {name!r} for {tensors[0].dtype} tensors on "
                                   f"{tensors[0].device} (rebuild it with `make install` for CPU tensors)")
    return getattr(ext, name) if supported else None


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def nearswap(base: torch.Tensor, x: torch.Tensor, t: float, *, out_dtype: torch.dtype, impl: str = "auto",
             out: torch.Tensor | None = None) -> torch.Tensor:
    kernel = _kernel(impl, [base, x], "nearswap")
    if kernel is None:
        return _into(nearswap_ref(base, x, t, out_dtype), out)
    return kernel(base.contiguous(), x.contiguous(), float(t), out_dtype, out=out)


def ram(base: torch.Tensor, xs: list[torch.Tensor], epsilon: float, *, plus: tuple[float, float] | None = None,
        out_dtype: torch.dtype, impl: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """RAM; RAM+ (tensor-local) when plus = (r, alpha). See reference_agents.py."""
    kernel = _kernel(impl, [base, *xs], "ram")
    if kernel is None:
        return _into(ram_ref(base, xs, epsilon, out_dtype, plus), out)
    base, xs = base.contiguous(), [x.contiguous() for x in xs]
    scales = []
    if plus is not None:
        counts = _kernel(impl, [base, *xs], "ram_counts")(base, xs, float(epsilon))
        scales = [ramplus_scale(counts[2 * i], counts[2 * i + 1], *plus) for i in range(len(xs))]
    return kernel(base, xs, float(epsilon), scales, out_dtype, out=out)
