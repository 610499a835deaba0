"""Loads the compiled merge ops (nova_rt._C), building them just in time when the package was installed unbuilt.

setup.py compiles csrc/merge/ into nova_rt/_C*.so at install time (`pip install --no-build-isolation -e .` or
`python setup.py build_ext --inplace`). A plain source checkout has no .so, so the first call here compiles the same
sources with torch.utils.cpp_extension.load into a cache directory (NOVA_RT_EXT_CACHE, else
~/.cache/nova_rt/ext/<torch version>-<cpu|cuda>), which later processes reuse. The CUDA sources are added only when
torch has CUDA and nvcc is found, as in setup.py. NOVA_RT_NO_EXT=1 disables the extension entirely (callers then use
the PyTorch reference).
"""

from __future__ import annotations

import glob
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

_lock = threading.Lock()
_module: ModuleType | None = None
_error: Exception | None = None

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc" / "merge"


class ExtensionUnavailable(RuntimeError):
    """nova_rt._C is neither installed nor buildable here (no sources, no compiler, or NOVA_RT_NO_EXT=1)."""


def _cache_dir(with_cuda: bool) -> Path:
    import torch

    root = os.environ.get("NOVA_RT_EXT_CACHE") or os.path.join(Path.home(), ".cache", "nova_rt", "ext")
    tag = f"{torch.__version__.replace('+', '_')}-{'cuda' if with_cuda else 'cpu'}"
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build() -> ModuleType:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    cpp = sorted(glob.glob(str(CSRC_DIR / "*.cpp")))
    if not cpp:
        raise ExtensionUnavailable(f"nova_rt._C is not installed and no C++ sources were found under {CSRC_DIR}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ExtensionUnavailable(
            f"nova_rt._C is not installed and no C++ compiler ({compiler!r}) is on PATH to build it; install a "
            "compiler, or build at install time with `pip install --no-build-isolation -e .`"
        )
    cu = sorted(glob.glob(str(CSRC_DIR / "*.cu")))
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None
    march = os.environ.get("NOVA_RT_MARCH", "x86-64-v3")  # same as setup.py
    cflags = ["-O3", "-fopenmp"] + ([f"-march={march}"] if os.uname().machine == "x86_64" else [])
    kwargs = {}
    if with_cuda:
        kwargs = dict(extra_cuda_cflags=["-O3", "-lineinfo"], extra_cflags=cflags + ["-DNOVA_RT_WITH_CUDA=1"])
    else:
        kwargs = dict(extra_cflags=cflags)
    return load(
        name="nova_rt_merge_ext",
        sources=cpp + (cu if with_cuda else []),
        extra_ldflags=["-fopenmp"],
        build_directory=str(_cache_dir(with_cuda)),
        verbose=os.environ.get("NOVA_RT_EXT_VERBOSE") == "1",
        **kwargs,
    )


def load_extension() -> ModuleType:
    """The merge-ops module: the installed nova_rt._C, else a JIT build; raises ExtensionUnavailable otherwise."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise ExtensionUnavailable(str(_error)) from _error
        if os.environ.get("NOVA_RT_NO_EXT") == "1":
            raise ExtensionUnavailable("NOVA_RT_NO_EXT=1: the compiled merge ops are disabled")
        try:
            from nova_rt import _C  # type: ignore[attr-defined]

            _module = _C
        except ImportError:
            try:
                _module = _jit_build()
            except Exception as exc:  # noqa: BLE001 - compiler or toolchain failure: remember and report it
                _error = exc
                raise ExtensionUnavailable(f"could not build nova_rt._C just in time: {exc}") from exc
        return _module


def extension_available() -> bool:
    """True when load_extension() succeeds (building it if needed)."""
    try:
        load_extension()
    except ExtensionUnavailable:
        return False
    return True
