"""train.cpu_allocator: with "cached", large blocks freed by one step are reused by the next instead of being
unmapped and faulted in again. Counted in a subprocess (the allocator policy is process-wide)."""

import subprocess
import sys

import pytest

from nova_rt.cpu_runtime import cpu_allocator

PROBE = r"""
import resource, sys, torch
from nova_rt.cpu_runtime import cpu_allocator
assert cpu_allocator(sys.argv[1])
faults = 0
for i in range(12):  # the first rounds grow the heap (64-byte-aligned requests do not fit a freed block exactly)
    if i == 6:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20).normal_()  # 64 MiB, over glibc's largest mmap threshold
    y = x * 2.0
    del x, y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_cached_allocator_reuses_large_blocks():
    if not cpu_allocator("system"):  # also the state the test process is left in
        pytest.skip("C library without mallopt")
    system, cached = _faults("system"), _faults("cached")
    pages = 6 * 2 * (64 * 2**20) // 4096  # every 64 MiB block faulted in page by page under "system"
    assert system > pages // 2, (system, pages)
    assert cached < system // 10, (cached, system)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="train.cpu_allocator"):
        cpu_allocator("jemalloc")
