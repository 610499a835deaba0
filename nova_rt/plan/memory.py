"""Memory per rank: the static part (parameters, gradients, optimizer states: exact, checked byte for byte against
what the backends allocate on CPU, tests/plan) and activations (the bytes autograd saves for backward).

Static, megatron (nova_rt.parallel.megatron_trainer): per model chunk one DDP buffer of fp32 gradients
(grad_reduce_in_fp32); with the distributed optimizer also a parameter buffer, every parameter starting at a multiple
of 64 elements and every bucket (one per chunk; a tied embedding's copy in its own) padded to lcm(DP, 128); each DP
rank keeps Adam's two moments (and fp32 main params for 16-bit weights) of its 1/DP of every bucket. torch AdamW also
keeps one 4-byte `step` per parameter tensor. HF backend (nova_rt.trainer): DDP holds everything in the trained dtype
(fp32 unless model.master_weights=model_dtype) plus gradient buckets of the same size; FSDP2 shards dim 0 of every
tensor into ceil(rows / DP)-row pieces (parameters and gradients padded, Adam states not).
Activations: see hf_activation_bytes / megatron_activation_bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nova_rt.plan.shapes import MegatronParam, ModelShape, hf_param_shapes, megatron_chunk_params

STEP_BYTES = 4  # torch AdamW's per-tensor step counter (fp32 scalar)


@dataclass
class Static:
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    comm: int = 0  # gradient buckets / all-gather buffers that live as long as the model

    def add(self, other: Static) -> None:
        self.params += other.params
        self.grads += other.grads
        self.optimizer += other.optimizer
        self.comm += other.comm


def megatron_buffer(params: list[MegatronParam], dp: int, dist_opt: bool) -> tuple[int, list, list]:
    """megatron-core's _ParamAndGradBuffer layout of one chunk (overlap_grad_reduce off: no size-based buckets):
    (padded numel, [(start, end, bucket)] in registration order, [(bucket start, bucket end)])."""
    def pad(n: int, divisor: int) -> int:
        return math.ceil(n / divisor) * divisor

    bucket_divisor = math.lcm(dp, 128)
    ranges: dict[int, tuple[int, int, int]] = {}
    buckets: list[tuple[int, int]] = []
    start = bucket_start = 0
    in_bucket = 0
    end = 0
    order = list(range(len(params)))[::-1]  # megatron walks parameters in reverse (backprop order)

    def close(at: int) -> int:
        nonlocal bucket_start, in_bucket
        bucket_end = pad(at, bucket_divisor) if dist_opt else at
        buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for index in order:
        param = params[index]
        if dist_opt:
            start = pad(start, 64)
        separate = param.shared_embedding and dist_opt
        if separate and in_bucket:
            start = close(start)
        end = start + param.numel
        ranges[index] = (start, end, len(buckets))
        in_bucket += 1
        start = close(end) if separate else end
    if in_bucket:
        close(end)
    numel = buckets[-1][1] if buckets else 0
    return numel, [ranges[i] for i in range(len(params))], buckets


def megatron_static(shape: ModelShape, tp: int, pp: int, vpp: int, dp: int, dist_opt: bool, param_bytes: int,
                    stage: int, dp_rank: int = 0, head: str = "lm") -> Static:
    """Static bytes of one rank (pipeline stage `stage`, data-parallel rank `dp_rank`) of the megatron backend."""
    out = Static()
    for chunk in range(max(vpp, 1)):
        params = megatron_chunk_params(shape, tp, pp, vpp, stage, chunk, head)
        numel, ranges, buckets = megatron_buffer(params, dp, dist_opt)
        out.grads += 4 * numel  # grad_reduce_in_fp32
        if not dist_opt:
            out.params += param_bytes * numel
            main = 4 * numel if param_bytes != 4 else 0  # Float16Optimizer's fp32 copies
            out.optimizer += main + 8 * numel + STEP_BYTES * len(params)
            continue
        out.params += param_bytes * numel
        for start, end, bucket in ranges:
            bucket_start, bucket_end = buckets[bucket]
            size = (bucket_end - bucket_start) // dp
            lo, hi = bucket_start + dp_rank * size, bucket_start + (dp_rank + 1) * size
            shard = max(0, min(end, hi) - max(start, lo))
            if shard:
                out.optimizer += 8 * shard + STEP_BYTES + (4 * shard if param_bytes != 4 else 0)
    return out


def hf_static(shape: ModelShape, dp: int, kind: str, param_bytes: int, dp_rank: int = 0, head: str = "lm") -> Static:
    """Static bytes of one rank of the HF backend: kind "ddp" (or a single process) or "fsdp2"."""
    tensors = hf_param_shapes(shape, head)
    if kind != "fsdp2" or dp == 1:
        numel = sum(rows * cols for rows, cols in tensors)
        comm = param_bytes * numel if dp > 1 else 0  # DDP's gradient buckets (gradient_as_bucket_view off)
        return Static(param_bytes * numel, param_bytes * numel, 2 * param_bytes * numel + STEP_BYTES * len(tensors),
                      comm)
    out = Static()
    for rows, cols in tensors:
        chunk = math.ceil(rows / dp)
        local = max(0, min(chunk, rows - dp_rank * chunk))
        out.params += param_bytes * chunk * cols
        out.grads += param_bytes * chunk * cols
        out.optimizer += 2 * param_bytes * local * cols + STEP_BYTES
    # all-gather of one decoder layer's parameters (and the next one's, prefetched) while it runs
    out.comm = 2 * param_bytes * shape.layer_params()
    return out


def hf_activation_bytes(shape: ModelShape, doc_lengths: list[int], targets: int, *, param_bytes: int,
                        compute_bytes: int, checkpoint_every: int = 0, attention: str = "triton",
                        window: int = 128) -> int:
    """Bytes autograd saves for backward in one forward of the HF backend's CausalLMLogprobs over one packed row
    (documents `doc_lengths`, `targets` supervised tokens), as transformers' Llama / Qwen2 layers save them:

    per token: the input ids; the embedding output and each layer's two residuals (param dtype); per RMSNorm its
    fp32 rsqrt and normalised input and its output (once, or once per projection reading it under autocast, which
    casts the input again for each; with 16-bit weights its fp32 upcast input instead of the residual); q and k
    after RoPE and v; attention's fp32 log-sum-exp and output (and the contiguous copy the CPU path makes); gate,
    up, silu(gate) and their product (GPT MLP: fc1 and activation outputs); cos and sin. Under autocast over
    fp32 weights also the bf16 copy of every layer's weight matrices. The final norm and the fused log-prob op:
    the selected hidden rows, targets and log-sum-exp. attention="torch" (CPU) adds each multi-document window's
    (w, w) mask. checkpoint_every=k keeps only each group's input (nova_rt.models.checkpointing)."""
    tokens = sum(doc_lengths)
    d, q, kv, f, heads = shape.hidden, shape.q_width, shape.kv_width, shape.ffn, shape.heads
    mixed = compute_bytes < param_bytes
    pure16 = param_bytes == 2  # 16-bit weights: each norm saves its fp32 upcast input instead of the residual
    head_out = targets * (param_bytes * d + 8 + 4)  # selected hidden rows, targets, lse
    if checkpoint_every:  # the group inputs (the first is the embedding output) and the final norm
        groups = math.ceil(shape.layers / checkpoint_every)
        return tokens * (8 + (groups + 1) * param_bytes * d + 4 + 4 * d + 1) + head_out
    residual = 0 if pure16 else param_bytes * d

    def norm(readers: int) -> int:  # rsqrt, normalised input, output (per reader under autocast's casts)
        if pure16:
            return 4 * d + 4 + 2 * d + 2 * d
        return 4 + 4 * d + (readers * compute_bytes * d if mixed else param_bytes * d)

    attention_out = (2 if attention == "torch" else 1) * compute_bytes * q
    per_layer = (norm(3) + norm(2) + compute_bytes * (q + 2 * kv) + 4 * heads + attention_out + 2 * residual
                 + (4 if shape.gated else 2) * compute_bytes * f)
    final = (4 * d + 4 + 2 * d) if pure16 else (4 + 4 * d)
    rope = 2 * shape.head_dim * param_bytes
    total = tokens * (8 + residual + shape.layers * per_layer + rope + final + 1) + head_out
    if mixed:  # autocast's cached bf16 copies of the weight matrices, saved by every matmul
        total += compute_bytes * shape.layers * (d * (q + 2 * kv) + q * d + shape.mlp_matrices * d * f)
    if attention == "torch":
        total += shape.layers * _window_masks(doc_lengths, window, compute_bytes)
    return total


def _window_masks(doc_lengths: list[int], window: int, element_bytes: int) -> int:
    """Bytes of the (w, w) masks (compute dtype) nova_rt.kernels.packed_attention_torch builds per window of several
    documents."""
    cu = [0]
    for n in doc_lengths:
        cu.append(cu[-1] + n)
    total, i, docs = 0, 0, len(doc_lengths)
    while i < docs:
        j = i + 1
        while j < docs and cu[j + 1] - cu[i] <= window:
            j += 1
        if j - i > 1:
            total += element_bytes * (cu[j] - cu[i]) ** 2
        i = j
    return total


def megatron_activation_bytes(shape: ModelShape, tokens: int, layers: int, tp: int, sequence_parallel: bool,
                              checkpoint: bool, compute_bytes: int = 2) -> int:
    """Bytes saved for backward by `layers` megatron layers (Transformer Engine, flash attention) over `tokens` of
    one micro-batch on one rank (already divided by CP), the per-layer inventory of Korthikanti et al. 2022 for GQA
    and SwiGLU: norm inputs and outputs (split over TP under SP), qkv, q/k after RoPE, attention output, fp32 lse,
    fc1 (2F) and swiglu (F) outputs (split over TP), fp32 rstd. Full recompute keeps each layer's input only."""
    d, q, kv, f = shape.hidden, shape.q_width, shape.kv_width, shape.ffn
    split = tp if sequence_parallel else 1
    if checkpoint:
        return layers * tokens * compute_bytes * d // split
    mlp = (3 if shape.gated else 2) * f  # fc1 output (2F gated) and the activation's output (F)
    per_token = (compute_bytes * (4 * d / split + ((q + 2 * kv) + (q + kv) + q + mlp) / tp)
                 + 8 / split + 4 * shape.heads / tp)
    return int(layers * tokens * per_token)
