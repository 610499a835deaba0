"""csrc/merge/*.cu compiles for sm_90 with nvcc on this CPU machine, with no register spills (aot_cuda.py)."""

import pytest

from nova_rt.kernels import aot_cuda

_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z5otherPd' for 'sm_90'
ptxas info    : Function properties for _Z5otherPd
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_parse_ptxas_and_failures():
    ks = aot_cuda.parse_ptxas(_LOG)
    assert [(k["kernel"], k["regs"], k["stack"], k["spill_stores"], k["spill_loads"]) for k in ks] == [
        ("_Z6kernelPf", 38, 0, 0, 0), ("_Z5otherPd", 255, 24, 16, 8)]
    ok = dict(sources=["a.cu"], returncode=0, errors=[], log="", kernels=ks[:1])
    assert aot_cuda.failures(ok) == []
    assert "spills 16 B" in aot_cuda.failures({**ok, "kernels": ks})[0]
    assert "nvcc exited 1" in aot_cuda.failures({**ok, "returncode": 1, "errors": ["x.cu(3): error: bad"]})[0]
    assert "no kernels" in aot_cuda.failures({**ok, "kernels": []})[0]
    assert aot_cuda._ERROR.search("merge_cuda.cu(12): error: identifier \"x\" is undefined")
    assert not aot_cuda._ERROR.search("warning #3189-D: \"module\" is parsed as an identifier")


@pytest.mark.slow
@pytest.mark.skipif(aot_cuda.find_nvcc() is None, reason="nvcc not on PATH or CUDA_HOME")
def test_merge_cuda_sources_compile_for_sm90():
    res = aot_cuda.compile_merge_sources(arch=90)
    ks = res["kernels"]
    print(f"{len(ks)} kernels, max regs {max((k['regs'] or 0 for k in ks), default=0)}, {res['seconds']:.0f} s, "
          f"stub header {res['stub_header']}")
    assert not aot_cuda.failures(res), "\n".join(aot_cuda.failures(res))
    assert all(k["arch"] == "sm_90" for k in ks)
    assert {"merge_cuda.cu"} <= {s.rsplit("/", 1)[-1] for s in res["sources"]}
