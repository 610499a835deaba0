"""GPUs the planner knows: memory, the bf16 rate it assumes achievable, HBM and interconnect bandwidths.

Every number is a stated assumption (docs/plan.md gives the sources): datasheet memory, peaks and HBM bandwidth (SXM
parts); GEMMs at the Maximum Achievable Matmul FLOPS measured with mamf-finder (stas00/ml-engineering: H100 SXM 794.5,
A100 SXM 271.2 TFLOP/s bf16; H200 taken as H100); causal flash attention forward + backward at 40% (H100) / 60% (A100)
of peak (FlashAttention-2's published rates at head dim 128); NVLink as NCCL's all-reduce bus bandwidth inside a node;
one 400 Gb/s NIC per GPU between nodes (50 GB/s line rate, 40 GB/s assumed achieved; A100: 200 Gb/s).
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
    attention_bf16: float
    """FLOP/s of causal flash attention, forward + backward (its model FLOPs over its time)."""
    hbm: float
    """HBM bytes/s (memory-bound element-wise work)."""
    nvlink: float
    """NCCL bus bandwidth inside a node, bytes/s."""
    network: float
    """Per-GPU bandwidth between nodes, bytes/s."""


GPUS = {
    "h100-80gb": Gpu("h100-80gb", int(79.6 * GIB), 989e12, 794.5e12, 0.40 * 989e12, 3.35e12, 360e9, 40e9),
    "h200-141gb": Gpu("h200-141gb", int(139.8 * GIB), 989e12, 794.5e12, 0.40 * 989e12, 4.8e12, 360e9, 40e9),
    "a100-80gb": Gpu("a100-80gb", int(79.2 * GIB), 312e12, 271.2e12, 0.60 * 312e12, 2.04e12, 230e9, 20e9),
}

ALLOCATOR_RESERVE_BYTES = 2 * GIB
"""Kept free of the budget: the CUDA context and NCCL's own buffers (~0.5-1 GiB), cuBLAS workspaces and the caching
allocator's fragmentation. A stated allowance, not a measurement."""


def gpu_named(name: str) -> Gpu:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"--gpu {name}: unknown GPU; known: {', '.join(GPUS)}") from None
