"""Builds nova_rt._C (weight-space merge ops) from csrc/merge/.

The CPU sources (OpenMP) are always built. The CUDA sources are added only where torch was built with CUDA and
nvcc exists (CUDA_HOME set); on CPU-only torch they are skipped. Install with `pip install --no-build-isolation`
so the build uses the torch already installed (an isolated build env would download a CUDA torch).
If the package is installed without building (e.g. a plain source checkout), nova_rt/_C_loader.py JIT-builds the
same sources on first use.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
cpp_sources = sorted(glob.glob("csrc/merge/*.cpp"))
if cpp_sources and os.environ.get("NOVA_RT_SKIP_EXT") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # x86-64-v3 (AVX2 + FMA: every x86 host of an H100/H200 has it) lets the element loops vectorize 8-wide;
    # NOVA_RT_MARCH overrides it (e.g. "native" for AVX-512, or "x86-64-v2" for old CPUs).
    march = os.environ.get("NOVA_RT_MARCH", "x86-64-v3")
    cxx_flags = ["-O3", "-fopenmp", f"-march={march}"] if os.uname().machine == "x86_64" else ["-O3", "-fopenmp"]
    cu_sources = sorted(glob.glob("csrc/merge/*.cu"))
    use_cuda = bool(cu_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if use_cuda:
        ext = CUDAExtension(
            "nova_rt._C",
            cpp_sources + cu_sources,
            define_macros=[("NOVA_RT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("nova_rt._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
