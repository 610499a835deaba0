"""Compile the CUDA merge sources (csrc/merge/*.cu) for sm_90 with nvcc on a machine without a GPU; report ptxas.

Why: setup.py builds the CUDA half of nova_rt._C only where torch has CUDA, so on the CPU machines the project
runs on, `merge_cuda.cu` was never compiled. nvcc needs no GPU, only headers: this runs nvcc -c (host and device
code, no link) for sm_90 with `-Xptxas -v` and the flags torch's CUDAExtension would use (torch's
COMMON_NVCC_FLAGS, C++20, the extension defines, setup.py's -O3 -lineinfo), then parses each kernel's registers,
stack frame and spill bytes.

The CPU torch wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h (CMake writes it only for CUDA
builds); when it is missing, a stub with the one macro a shared-library build defines (C10_CUDA_BUILD_SHARED_LIBS,
as in a CUDA wheel) goes into a temporary include directory searched after torch's own.

    python -m nova_rt.kernels.aot_cuda [--arch 90]      # prints one line per kernel; exit 1 on error or spill
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_STUB = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"  # what CMake generates for a shared-library build
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_ERROR = re.compile(r"(: error\b|\berror:|\bfatal\s*:)", re.IGNORECASE)  # nvcc / cicc / ptxas error lines


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    return cand if cand and os.access(cand, os.X_OK) else shutil.which("nvcc")


def nvcc_command(src: str, out: str, stub_dir: str, arch: int = 90, extra: tuple[str, ...] = ()) -> list[str]:
    """The nvcc -c command for one .cu file, with torch's extension flags and include paths."""
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    incs = [*include_paths(), sysconfig.get_paths()["include"], str(REPO / "csrc" / "merge")]
    defines = ["NOVA_RT_WITH_CUDA=1", "TORCH_API_INCLUDE_EXTENSION_H", "TORCH_EXTENSION_NAME=_C",
               f"_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    return [find_nvcc() or "nvcc", "-c", src, "-o", out, "-std=c++20", "-O3", "-lineinfo",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-Xcompiler", "-fPIC",
            *COMMON_NVCC_FLAGS, *(f"-D{d}" for d in defines), *(f"-I{i}" for i in incs), f"-I{stub_dir}", *extra]


def parse_ptxas(log: str) -> list[dict]:
    """One dict per kernel (entry function) from a `ptxas -v` log: name, arch, regs, stack, spill bytes."""
    rows, cur = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = dict(kernel=m.group(1), arch=m.group(2), regs=None, stack=None, spill_stores=None, spill_loads=None)
            rows.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _REGS.search(line)):
            cur["regs"] = int(m.group(1))
    return rows


def compile_merge_sources(arch: int = 90, sources: list[str] | None = None, extra: tuple[str, ...] = ()) -> dict:
    """nvcc -c every csrc/merge/*.cu (or `sources`) for sm_<arch>, with `extra` nvcc flags appended:
    {sources, returncode, seconds, kernels, errors, log}."""
    import torch
    from torch.utils.cpp_extension import include_paths

    sources = sources if sources is not None else sorted(glob.glob(str(REPO / "csrc" / "merge" / "*.cu")))
    result = dict(sources=[os.path.relpath(s, REPO) for s in sources], returncode=0, seconds=0.0, kernels=[],
                  errors=[], log="")
    with tempfile.TemporaryDirectory(prefix="nova_nvcc_") as tmp:
        header = "c10/cuda/impl/cuda_cmake_macros.h"
        has_header = any(os.path.exists(os.path.join(d, header)) for d in include_paths())
        if not has_header:
            os.makedirs(os.path.join(tmp, "c10/cuda/impl"))
            Path(tmp, header).write_text(_STUB)
        result["stub_header"] = not has_header
        for src in sources:
            cmd = nvcc_command(src, os.path.join(tmp, Path(src).stem + ".o"), tmp, arch, extra)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            result["seconds"] += time.perf_counter() - t0
            log = proc.stdout + proc.stderr
            result["log"] += log
            result["returncode"] = result["returncode"] or proc.returncode
            result["errors"] += [ln for ln in log.splitlines() if _ERROR.search(ln)]
            result["kernels"] += [dict(k, source=os.path.relpath(src, REPO)) for k in parse_ptxas(log)]
    result["torch"] = torch.__version__
    return result


def failures(result: dict) -> list[str]:
    """What is wrong with a compile_merge_sources result (empty when every kernel built without spills)."""
    bad = []
    if not result["sources"]:
        bad.append("no csrc/merge/*.cu sources found")
    if result["returncode"] != 0 or result["errors"]:
        bad.append(f"nvcc exited {result['returncode']}: " + "\n".join(result["errors"][:20] or
                                                                      result["log"].splitlines()[-20:]))
    if result["sources"] and not result["kernels"]:
        bad.append("ptxas -v reported no kernels")
    for k in result["kernels"]:
        if k["spill_stores"] is None or k["regs"] is None:
            bad.append(f"{k['kernel']}: incomplete ptxas report")
        elif k["spill_stores"] or k["spill_loads"]:
            bad.append(f"{k['kernel']}: spills {k['spill_stores']} B stores / {k['spill_loads']} B loads")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--extra", default="", help="more nvcc flags, space-separated (e.g. -maxrregcount=16)")
    args = ap.parse_args(argv)
    if find_nvcc() is None:
        print("nvcc not found (PATH, CUDA_HOME)", file=sys.stderr)
        return 2
    res = compile_merge_sources(args.arch, extra=tuple(args.extra.split()))
    for k in res["kernels"]:
        print(f"{k['arch']} regs={k['regs']:3d} stack={k['stack']} spills={k['spill_stores']}/{k['spill_loads']} "
              f"{k['kernel']}")
    ks = res["kernels"]
    print(f"{len(ks)} kernels from {', '.join(res['sources'])} in {res['seconds']:.0f} s; max regs "
          f"{max((k['regs'] or 0 for k in ks), default=0)}, spills {sum(k['spill_stores'] or 0 for k in ks)} B, "
          f"stub header {'used' if res['stub_header'] else 'not needed'}")
    bad = failures(res)
    for msg in bad:
        print("FAIL", msg, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
