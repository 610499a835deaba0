"""Per-tensor merge ops with one signature for both implementations: the C++/CUDA extension (nova_rt._C) or PyTorch.

impl="auto" uses the extension when it loads (see nova_rt/_C_loader.py) and supports the tensors (CPU always;
CUDA only when it was built with CUDA), else the reference in reference.py; "ext" insists on the extension and
"torch" forces the reference. The math of every op is in reference.py's docstring. `out` (optional): a contiguous
tensor of the inputs' shape and out_dtype to write the result into (the extension writes it directly; the reference
copies), returned.
"""

from __future__ import annotations

import torch

from nova_rt._C_loader import ExtensionUnavailable, load_extension
from nova_rt.merge.reference import (
    GtaParams,
    gta_ref,
    model_stock_ref,
    slerp_ref,
    weighted_sum_ref,
)

IMPLS = ("auto", "ext", "torch")
_MAX_CUDA_INPUTS = 33  # base + kMaxModels (csrc/merge/merge.h)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _contiguous(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.contiguous() for x in xs]


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    return out.copy_(result)


def _extension_for(impl: str, tensors: list[torch.Tensor]):
    """The extension module when it should run these tensors, else None (reference)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return None
    try:
        ext = load_extension()
    except ExtensionUnavailable:
        if impl == "ext":
            raise
        return None
    supported = all(t.dtype in FLOAT_DTYPES for t in tensors)
    if tensors[0].is_cuda:
        supported = supported and ext.has_cuda() and len(tensors) <= _MAX_CUDA_INPUTS
    if not supported and impl == "ext":
        raise ExtensionUnavailable(
            f"nova_rt._C cannot merge {tensors[0].dtype} tensors on {tensors[0].device} "
            f"(CUDA support compiled in: {ext.has_cuda()})"
        )
    return ext if supported else None


def extension_usable(impl: str) -> bool:
    """Whether impl may run on the extension and it loads (row-blocked merging needs it)."""
    if impl == "torch":
        return False
    try:
        load_extension()
    except ExtensionUnavailable:
        return False
    return True


def weighted_sum(xs: list[torch.Tensor], weights: list[float], scale: float = 1.0, *,
                 out_dtype: torch.dtype | None = None, impl: str = "auto",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """scale * sum_i weights[i] * xs[i], accumulated in fp32, returned in out_dtype (default: the inputs' dtype)."""
    out_dtype = out_dtype or xs[0].dtype
    ext = _extension_for(impl, xs)
    if ext is None:
        return _into(weighted_sum_ref(xs, list(weights), scale, out_dtype), out)
    return ext.weighted_sum(_contiguous(xs), [float(w) for w in weights], float(scale), out_dtype, out=out)


def gta(base: torch.Tensor, xs: list[torch.Tensor], params: GtaParams, *, out_dtype: torch.dtype | None = None,
        impl: str = "auto", out: torch.Tensor | None = None, offset: int = 0,
        keep: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
    """Generalized task arithmetic (task arithmetic, TIES, DARE): see reference.gta_ref.

    Row-blocked merging (blocked.py, extension only): the inputs are flat elements [offset, offset + numel) of a
    larger tensor, and keep = (magnitude bits, tie cutoff) per model of that whole tensor's TIES top-k."""
    out_dtype = out_dtype or base.dtype
    ext = _extension_for("ext" if offset or keep else impl, [base, *xs])
    if ext is None:
        return _into(gta_ref(base, xs, params, out_dtype), out)
    p = params
    thr, cutoff = keep if keep is not None else ([], [])
    return ext.gta(base.contiguous(), _contiguous(xs), [float(w) for w in p.weights], [float(d) for d in p.densities],
                   int(p.sparsify), bool(p.consensus), bool(p.normalize), float(p.lam), bool(p.rescale), int(p.seed),
                   int(p.tensor_id), out_dtype, out=out, offset=int(offset), mag_thr=list(thr),
                   mag_cutoff=list(cutoff))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None,
          dot_threshold: float = 0.9995, eps: float = 1e-8, impl: str = "auto",
          out: torch.Tensor | None = None, partials: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1); lerp when the tensors are nearly colinear.
    partials (row-blocked merging, extension only): the whole tensor's chunk sums (blocked.py), a and b one block."""
    out_dtype = out_dtype or a.dtype
    ext = _extension_for("ext" if partials is not None else impl, [a, b])
    if ext is None:
        return _into(slerp_ref(a, b, t, out_dtype, dot_threshold, eps), out)
    return ext.slerp(a.contiguous(), b.contiguous(), float(t), float(dot_threshold), float(eps), out_dtype, out=out,
                     partials=partials)


def model_stock(base: torch.Tensor, xs: list[torch.Tensor], row_len: int = 0, *,
                out_dtype: torch.dtype | None = None, impl: str = "auto",
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Model Stock with statistics per row of row_len elements (0: the whole tensor)."""
    out_dtype = out_dtype or base.dtype
    ext = _extension_for(impl, [base, *xs])
    if ext is None:
        return _into(model_stock_ref(base, xs, row_len, out_dtype), out)
    return ext.model_stock(base.contiguous(), _contiguous(xs), int(row_len), out_dtype, out=out)
