"""Memory per rank: the static part (parameters, gradients, optimizer states: exact, checked byte for byte against
what the backends allocate on CPU, tests/plan) and activations (the bytes autograd saves for backward).

Static, megatron (nova_rt.parallel.megatron_trainer): per model chunk one DDP buffer of fp32 gradients
(grad_reduce_in_fp32); with the distributed optimizer also a parameter buffer, every parameter starting at a multiple
of 64 elements and every bucket (one per chunk; a tied embedding's copy in its own) padded to lcm(DP, 128); each DP
rank keeps Adam's two moments (and fp32 main params for 16-bit weights) of its 1/DP of every bucket. torch AdamW also
keeps one 4-byte `step` per parameter tensor. HF backend (nova_rt.trainer): DDP holds everything in the trained dtype
(fp32 unless model.master_weights=model_dtype) plus gradient buckets of the same size; FSDP2 shards dim 0 of every
tensor into ceil(rows / DP)-row pieces (parameters and gradients padded, Adam states not).
Activations: see hf_activation_bytes / megatron_stage_bytes.
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


def megatron_layer_bytes(shape: ModelShape, tokens: int, tp: int, sequence_parallel: bool, compute_bytes: int = 2,
                         kernels: str = "te", doc_lengths: list[int] | None = None, window: int = 128) -> int:
    """Bytes one megatron decoder layer saves for backward over `tokens` tokens of one micro-batch on one TP rank
    (already divided by CP). kernels="te" (GPU: Transformer Engine, flash attention, fused SwiGLU; Korthikanti et al.
    2022's inventory for GQA: norm inputs and outputs, qkv, q/k after RoPE, attention output, fc1 and SwiGLU outputs,
    fp32 rstd and log-sum-exp; not checked here). kernels="local" (nova_rt's local spec as it runs on CPU, checked
    byte for byte by tests/plan/test_megatron_activations.py): per norm its fp32 input (the residual itself in fp32),
    rsqrt, normalised input and output; the qkv output (v is a view of it), RoPE's cos and sin for q and for k (not
    split over TP), q and k after RoPE, fp32 log-sum-exp, the attention output and its contiguous copy; fc1's output,
    silu(gate), up + offset and their product (unfused SwiGLU); each multi-document window's (w, w) mask. Under
    sequence parallelism the norms (and the linear layers' saved inputs) hold tokens / TP."""
    d, q, kv, f, heads, c = shape.hidden, shape.q_width, shape.kv_width, shape.ffn, shape.heads, compute_bytes
    split = tp if sequence_parallel else 1
    if kernels == "te":
        mlp = (3 if shape.gated else 2) * f  # fc1 output (2F gated) and the activation's output (F)
        per_token = c * (4 * d / split + ((q + 2 * kv) + (q + kv) + q + mlp) / tp) + 8 / split + 4 * heads / tp
        return round(tokens * per_token)
    norms = 2 * (4 * d + 4 + 2 * c * d) / split
    split_parts = c * (q + 2 * kv) + c * (q + kv) + 4 * heads + 2 * c * q + 5 * c * f
    per_token = norms + split_parts / tp + 4 * shape.head_dim * c
    masks = _window_masks(doc_lengths, window, c) if doc_lengths else 0
    return round(tokens * per_token) + masks


def megatron_stage_bytes(shape: ModelShape, tokens: int, layers: int, tp: int, sequence_parallel: bool, *,
                         in_flight: float = 1, checkpoint_every: int = 0, chunks: int = 1, first: bool = True,
                         last: bool = True, head: str = "lm", compute_bytes: int = 2, kernels: str = "te",
                         doc_lengths: list[int] | None = None, transient_logits: bool = True,
                         tp_rank: int | None = None) -> dict[str, int]:
    """Peak bytes held for backward on one pipeline stage of `layers` layers (`chunks` model chunks) with `in_flight`
    micro-batches of `tokens` tokens forwarded and not yet backwarded (1F1B), as {"activations", "logits"} at the
    peak. Per micro-batch: the input ids on the first stage (and under TP the vocab-range mask), every layer's
    bytes, or with recompute of groups of k layers (megatron's uniform method) each group's input (and once RoPE's
    fp32 frequencies). The last stage adds the final norm and the vocab-parallel cross entropy (fp32 softmax of the
    vocab / TP logits, its target and mask, the loss mask; the TP rank holding padded vocab columns also their mask:
    tp_rank None is the busiest, the last) at the end of the forward; with recompute the backward adds one group's
    layers while their inputs are still held. transient_logits: also the 16-bit logits the cross entropy copies to
    fp32 (alive during its forward, not saved)."""
    c = compute_bytes
    split = tp if sequence_parallel else 1
    layer = megatron_layer_bytes(shape, tokens, tp, sequence_parallel, c, kernels, doc_lengths)
    per_micro = (8 + (1 if tp > 1 else 0)) * tokens if first else 0
    extra = extra_once = 0
    if checkpoint_every:
        group = min(checkpoint_every, layers // chunks)
        hidden = c * shape.hidden * tokens // split
        per_micro += chunks * math.ceil(layers // chunks / group) * hidden
        # RoPE's fp32 frequencies, saved by every checkpoint; megatron caches them per document length, so micro-
        # batches in flight share one tensor
        extra_once = 4 * shape.head_dim * max(doc_lengths or [tokens])
        # backward: one group recomputed while its input is held; the layers save that same tensor when it is fp32
        # (local: the norm's fp32 input) or always (te: the norm keeps its input)
        extra = group * layer - (hidden if kernels == "te" or c == 4 else 0)
    else:
        per_micro += layers * layer
    final = 0
    logits = 0
    if last:
        final = round(tokens * ((4 * shape.hidden + 4 + 2 * c * shape.hidden) if kernels == "local" else
                                (2 * c * shape.hidden + 4)) / split)
        if head == "lm":
            vocab = math.ceil(shape.vocab / tp)  # padded to a multiple of TP, split
            final += 13 * tokens  # cross entropy's target mask and target, the loss mask
            rank = tp - 1 if tp_rank is None else tp_rank
            final += vocab if (rank + 1) * vocab > shape.vocab else 0  # the padded columns' mask
            logits = (4 + (c if transient_logits and c < 4 else 0)) * tokens * vocab
    base = round(in_flight * per_micro) + extra_once
    if base + extra > base + final + logits:  # the recomputing backward is the peak: the head's bytes are freed
        return {"activations": base + extra, "logits": 0}
    return {"activations": base + final, "logits": logits}
