"""GPUs the planner knows: memory, the bf16 rate it assumes achievable, HBM and interconnect bandwidths.

Every number is a stated assumption (docs/plan.md lists the sources): datasheet memory and peaks (SXM parts), an
achievable dense bf16 GEMM rate of ~75% of peak (what large cuBLAS GEMMs reach on H100 in public measurements; the
planner never claims more), NVLink as the bus bandwidth NCCL's all-reduce reaches inside one node, and one 400 Gb/s
InfiniBand NIC per GPU (50 GB/s line rate, 40 GB/s assumed achieved) between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from nova_rt.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    """What torch can allocate: the card's memory as nvidia-smi reports it."""
    peak_bf16: float
    """Dense bf16 FLOP/s, datasheet (MFU is measured against this)."""
    achievable_bf16: float
    """Dense bf16 FLOP/s the planner assumes GEMMs reach."""
    hbm: float
    """HBM bytes/s (memory-bound element-wise work)."""
    nvlink: float
    """NCCL bus bandwidth inside a node, bytes/s."""
    network: float
    """Per-GPU bandwidth between nodes, bytes/s."""


GPUS = {
    "h100-80gb": Gpu("h100-80gb", int(79.6 * GIB), 989e12, 0.75 * 989e12, 3.35e12, 360e9, 40e9),
    "h200-141gb": Gpu("h200-141gb", int(139.8 * GIB), 989e12, 0.75 * 989e12, 4.8e12, 360e9, 40e9),
    "a100-80gb": Gpu("a100-80gb", int(79.2 * GIB), 312e12, 0.75 * 312e12, 2.04e12, 230e9, 20e9),
}

ALLOCATOR_RESERVE_BYTES = 2 * GIB
"""Kept free of the budget: the CUDA context and NCCL's own buffers (~0.5-1 GiB), cuBLAS workspaces and the caching
allocator's fragmentation. A stated allowance, not a measurement."""


def gpu_named(name: str) -> Gpu:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"--gpu {name}: unknown GPU; known: {', '.join(GPUS)}") from None
