"""Step time of a layout from a roofline: GEMM FLOPs at the GPU's achievable bf16 rate, attention at its flash
attention rate, element-wise work at HBM bandwidth, TP / CP / DP / PP communication from message sizes over NVLink
or the network, and the pipeline bubble.

Model FLOPs (MFU's numerator, the Megatron-LM convention): 6 x (non-embedding parameters + LM head) per token plus
causal attention 6 x q_width x s per token, layer and document of s tokens. Full recompute executes one more forward
(a third more). An all-reduce moves 2 (n-1)/n of its message per GPU, an all-gather or reduce-scatter (n-1)/n, at the
bus bandwidth of the link the group spans (NVLink when it fits in a node). Megatron TP (with SP) costs two all-reduce
equivalents of the micro-batch's hidden states per layer forward and two backward; nova_rt's megatron backend
overlaps neither them nor the DP gradient reduction (overlap_grad_reduce off) unless `overlap_tp` / `overlap_dp` say
so (published runs); HF DDP / FSDP2 overlap theirs with backward. The 1F1B bubble is (PP-1) / (VPP x micro-batches)
of the compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from nova_rt.plan.hardware import Gpu
from nova_rt.plan.shapes import ModelShape

STEP_EFFICIENCY = 0.78
"""Fraction of the roofline compute time (GEMMs, attention, element-wise) a whole training step realises: kernel
launch gaps, clocks below the matmul benchmark's under a whole node's load, the small ops not modelled. The one
fitted constant: set on a single published run (llm-foundry's MPT-7B, 8 x H100, FSDP) and checked on the others
(docs/plan.md)."""

ELEMENTWISE_PASSES = 4
"""Non-GEMM kernels (norms, RoPE, SwiGLU, residuals, softmax of the loss) are taken as 4 HBM passes over the bytes
a layer saves for backward (written and read in forward, read and written again in backward)."""


@dataclass
class Timing:
    step_s: float
    compute_s: float
    elementwise_s: float
    bubble_s: float
    tp_s: float
    cp_s: float
    dp_s: float
    pp_s: float
    model_flops: float
    mfu: float
    tokens_per_s_per_gpu: float


def model_flops(shape: ModelShape, tokens: int, doc_length: int, head: str = "lm") -> tuple[float, float]:
    """(GEMM, attention) model FLOPs of forward + backward over `tokens` in documents of `doc_length` tokens."""
    dense = shape.layers * shape.layer_params() + (shape.hidden if head == "score" else shape.vocab * shape.hidden)
    attention = 6 * shape.q_width * doc_length * tokens * shape.layers  # sum over docs of s^2 = tokens x s
    return 6 * dense * tokens, attention


def link(gpu: Gpu, group_span: int, gpus_per_node: int) -> float:
    """Bus bandwidth of a group whose ranks span `group_span` consecutive GPUs."""
    return gpu.nvlink if group_span <= gpus_per_node else gpu.network


def step_time(*, shape: ModelShape, gpu: Gpu, gpus: int, gpus_per_node: int, tp: int, pp: int, vpp: int, cp: int,
              dp: int, micro_batches: int, micro_batch_tokens: int, doc_length: int, checkpoint: bool,
              saved_bytes_per_layer_token: float, dp_bytes: int, backend: str, overlap_dp: bool = False,
              overlap_tp: bool = False, head: str = "lm", compute_bytes: int = 2) -> Timing:
    """Predicted optimizer-step time of one layout. micro_batch_tokens: tokens of one micro-batch of one DP rank
    (before CP splits them); micro_batches: per DP rank and step; dp_bytes: what one rank's data-parallel collectives
    move per step before the (n-1)/n factor (all-reduce: 2 x gradients; reduce-scatter + all-gather: gradients +
    parameters; FSDP: two parameter all-gathers and a gradient reduce-scatter)."""
    step_tokens = micro_batch_tokens * micro_batches * dp
    gemm, attention = model_flops(shape, step_tokens, doc_length, head)
    flops = gemm + attention
    recompute = 4 / 3 if checkpoint else 1
    compute = recompute * (gemm / gpu.achievable_bf16 + attention / gpu.attention_bf16) / gpus / STEP_EFFICIENCY
    layers_here = shape.layers / pp
    local_tokens = micro_batch_tokens / cp
    passes = ELEMENTWISE_PASSES * (1.25 if checkpoint else 1)
    elementwise = (passes * saved_bytes_per_layer_token * local_tokens * layers_here * micro_batches / gpu.hbm
                   / STEP_EFFICIENCY)
    bubble = (pp - 1) / (max(vpp, 1) * micro_batches) * (compute + elementwise) if pp > 1 else 0.0
    message = local_tokens * shape.hidden * compute_bytes
    tp_s = 0.0
    if tp > 1:
        per_layer = (6 if checkpoint else 4) * 2 * (tp - 1) / tp * message / link(gpu, tp, gpus_per_node)
        tp_s = per_layer * layers_here * micro_batches
        if overlap_tp:  # Transformer Engine's userbuffers overlap (published runs): hidden behind the GEMMs
            tp_s = max(0.0, tp_s - 0.5 * compute)
    cp_s = 0.0
    if cp > 1:
        kv = local_tokens * 2 * shape.kv_width / tp * compute_bytes * (cp - 1)
        cp_s = (3 if checkpoint else 2) * kv / link(gpu, tp * cp, gpus_per_node) * layers_here * micro_batches
    dp_s = 0.0
    if dp * cp > 1:
        bandwidth = link(gpu, tp * cp * dp, gpus_per_node)
        ranks = dp * cp
        dp_s = (ranks - 1) / ranks * dp_bytes / bandwidth
        if overlap_dp or backend != "megatron":  # overlapped with backward: only what backward cannot hide
            dp_s = max(0.0, dp_s - 2 / 3 * (compute + elementwise)) + dp_s / max(shape.layers, 1)
    pp_s = 0.0
    if pp > 1:
        boundary = message / (tp if tp > 1 else 1)
        pp_s = 2 * (micro_batches + pp - 1) * boundary / link(gpu, tp * cp * dp * 2, gpus_per_node)
    step = compute + elementwise + bubble + tp_s + cp_s + dp_s + pp_s
    return Timing(step, compute, elementwise, bubble, tp_s, cp_s, dp_s, pp_s, flops,
                  flops / (step * gpus * gpu.peak_bf16), step_tokens / step / gpus)
