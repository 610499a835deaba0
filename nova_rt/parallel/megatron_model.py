"""A megatron-core GPTModel built from an HF Llama / Qwen2 config, with packed (thd) attention as its core.

The HF config maps onto megatron's TransformerConfig / GPTModel field by field (GQA, RMSNorm, SwiGLU, RoPE scaling,
qkv bias, tied embeddings); the vocab is padded to a multiple of `vocab_multiple * TP`, and pad lookups get no
gradient (HF padding_idx). The table: docs/parallelism.md#hf-config-to-megatron.

Core attention: megatron's local `DotProductAttention` refuses packed (thd) batches, so the local layer spec swaps in
`PackedCoreAttention`, which calls nova_rt's varlen kernel `packed_attention(q_TNH, k_TNH, v_TNH, cu_seqlens,
max_seqlen)` (imported lazily from nova_rt.kernels; per-document SDPA when it is not importable). With Transformer
Engine and CUDA, the TE spec is used instead (`TEDotProductAttention`; unrun). RoPE restarts at every document
through megatron's thd RoPE path, which also gives each local chunk its global positions under context parallelism.

Legend: T packed tokens, N heads (local to this TP rank), H head dim, S documents in a pack.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class HFArch:
    """The architecture facts read from an HF config that the megatron model and the converter both need."""

    model_type: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    qkv_bias: bool
    tied: bool
    max_positions: int
    init_std: float
    pad_token_id: int | None


def _rope_parameters(cfg) -> tuple[float, float | None]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    legacy = getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    if rope_type in (None, "default"):
        return float(theta), None
    merged = {**legacy, **params}
    if rope_type == "llama3":
        # megatron's RotaryEmbedding._apply_scaling hard-codes low=1, high=4, original_max=8192 (Llama 3.1)
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, want in fixed.items():
            if key in merged and float(merged[key]) != want:
                raise NotImplementedError(f"rope_scaling.{key}={merged[key]} is not supported by megatron-core "
                                          f"(only {want})")
        return float(theta), float(merged["factor"])
    raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported by the megatron backend "
                              "(supported: default, llama3)")


def hf_arch(cfg) -> HFArch:
    """Validate an HF config (transformers PretrainedConfig) and extract what the megatron model needs."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"config.model_type={model_type!r}: the megatron backend supports "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"config.hidden_act={cfg.hidden_act!r}: only silu (SwiGLU) is supported")
    if getattr(cfg, "mlp_bias", False):
        raise NotImplementedError("config.mlp_bias=True is not supported by the megatron backend")
    if model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise NotImplementedError("config.use_sliding_window=True (Qwen2) is not supported by the megatron backend")
    qkv_bias = True if model_type == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    if model_type == "llama" and qkv_bias:
        raise NotImplementedError("config.attention_bias=True (Llama: bias on q/k/v and o_proj) is not supported")
    theta, factor = _rope_parameters(cfg)
    heads = cfg.num_attention_heads
    return HFArch(
        model_type=model_type, hidden=cfg.hidden_size, ffn=cfg.intermediate_size, layers=cfg.num_hidden_layers,
        heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
        eps=cfg.rms_norm_eps, rope_theta=theta, rope_scaling_factor=factor, qkv_bias=qkv_bias,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)), max_positions=cfg.max_position_embeddings,
        init_std=getattr(cfg, "initializer_range", 0.02), pad_token_id=getattr(cfg, "pad_token_id", None),
    )


def padded_vocab_size(vocab: int, tp: int, multiple: int = 1) -> int:
    """Smallest size >= vocab divisible by multiple * tp (megatron splits the vocab evenly over TP ranks)."""
    step = max(1, multiple) * tp
    return int(math.ceil(vocab / step) * step)


def te_available() -> bool:
    """Transformer Engine is importable and a CUDA device exists (its kernels are CUDA-only)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


# ----------------------------------------------------------------------------------------------- core attention
def _sdpa_per_document(q_TNH, k_TNH, v_TNH, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None,
                       impl="auto"):
    """Fallback with packed_attention's signature: causal SDPA run on each document separately."""
    del max_seqlen, impl
    groups = q_TNH.shape[1] // k_TNH.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q = q_TNH[start:end].transpose(0, 1)
        k = k_TNH[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = v_TNH[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def packed_attention_fn():
    """nova_rt's packed_attention kernel when importable, else the per-document SDPA fallback."""
    try:
        from nova_rt.kernels.packed_attention import packed_attention
    except ImportError:
        return _sdpa_per_document
    return packed_attention


class PackedCoreAttention(MegatronModule):
    """Core attention for megatron's SelfAttention over packed rows: softmax(q k^T * scale) v inside each document.

    Accepts thd input (q (T, N, H) with PackedSeqParams) and megatron's default sbhd input (s, b, N, H; each row
    is one document). Same constructor and forward signature as megatron's DotProductAttention. With context
    parallelism (thd only) each rank holds its share of every document and K/V are all-gathered over the CP group
    (nova_rt.parallel.context_parallel).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError("attention dropout is not supported by PackedCoreAttention")
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.attention_fn = packed_attention_fn()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by PackedCoreAttention")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"PackedSeqParams.qkv_format={packed_seq_params.qkv_format!r}, expected 'thd'")
            if self.config.context_parallel_size > 1:
                return self._context_parallel(query, key, value, packed_seq_params)
            out_TNH = self.attention_fn(query, key, value, packed_seq_params.cu_seqlens_q,
                                        packed_seq_params.max_seqlen_q, causal=True,
                                        softmax_scale=self.softmax_scale)
            return out_TNH.reshape(out_TNH.shape[0], -1)
        if self.config.context_parallel_size > 1:
            raise NotImplementedError("context parallelism in PackedCoreAttention needs packed (thd) rows")
        s, b = query.shape[:2]
        flat = [x.transpose(0, 1).reshape(b * s, x.shape[2], x.shape[3]) for x in (query, key, value)]
        cu = torch.arange(0, b + 1, device=query.device, dtype=torch.int32) * s
        out_TNH = self.attention_fn(*flat, cu, s, causal=True, softmax_scale=self.softmax_scale)
        return out_TNH.reshape(b, s, -1).transpose(0, 1).contiguous()


    def _context_parallel(self, query, key, value, packed_seq_params):
        """This CP rank's tokens attend to their documents over the whole CP group (nova_rt.parallel.context_parallel);
        cu_seqlens are the padded global row's."""
        from megatron.core import parallel_state as ps

        from nova_rt.parallel.context_parallel import context_parallel_attention

        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        group = self.cp_group if self.cp_group is not None else ps.get_context_parallel_group()
        out_LNH = context_parallel_attention(query, key, value, cu, softmax_scale=self.softmax_scale, group=group)
        return out_LNH.reshape(out_LNH.shape[0], -1)


class RMSNorm(torch.nn.Module):
    """HF-exact RMSNorm (fp32 statistics) that marks its weight for sequence parallelism.

    megatron's torch fallback norm (no Apex / TE) refuses sequence parallelism: with SP each TP rank normalises a
    slice of the sequence, so the weight gradient must be summed over TP ranks, which `finalize_model_grads` does for
    parameters carrying `sequence_parallel=True`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class ScoreHead(torch.nn.Module):
    """A scalar reward head in GPTModel's `output_layer` slot: score[t] = w . h[t] for every token, (T, b, 1).

    GPTModel calls `output_layer(hidden, weight=None, runtime_gather_output=...)` and expects (logits, bias); with this
    head its "logits" are one score per token (the stage picks each sequence's last token; T dot products of length D
    cost nothing next to the decoder). The weight (1, D) is replicated on every TP rank, not split: the final norm's
    output is replicated too, so every TP rank computes the same scores, the same loss and the same full gradients,
    and neither the weight's gradient nor the hidden state's needs a TP reduction (megatron's grad norm counts a
    replicated parameter once). Under sequence parallelism each rank holds T/tp tokens, so the head first all-gathers
    the sequence, and its backward keeps this rank's slice of the (already full, identical) gradient instead of
    reduce-scattering it, which would count it tp times.
    """

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=config.params_dtype))

    def forward(self, hidden_TBD, weight=None, runtime_gather_output=None):
        del weight, runtime_gather_output
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_TBD = gather_from_sequence_parallel_region(hidden_TBD, tensor_parallel_output_grad=False)
        return F.linear(hidden_TBD, self.weight), None


# ----------------------------------------------------------------------------------------------- specs and model
def layer_spec(use_te: bool | None = None):
    """The decoder layer spec: TE's when `use_te` (default: TE importable with CUDA), else local + packed attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te is None:
        use_te = te_available()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def _block_spec(spec, config, vp_stage, use_te: bool):
    """Local spec: a block spec whose final norm is our RMSNorm too (megatron's default there refuses SP)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if use_te:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=RMSNorm)


def transformer_config(arch: HFArch, pcfg, *, dtype: torch.dtype, cpu: bool, init: bool = False,
                       recompute_layers: int = 0):
    """megatron TransformerConfig for `arch` under ParallelConfig `pcfg` (fusions off on CPU: they need CUDA).
    recompute_layers=k > 0: full activation recompute of groups of k consecutive layers of each model chunk, only
    each group's input kept (megatron's "uniform" method; k divides the chunk's layers)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    vpp = pcfg.virtual_pipeline_parallel or None
    recompute = {}
    if recompute_layers:
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": recompute_layers}
    return TransformerConfig(
        num_layers=arch.layers, hidden_size=arch.hidden, ffn_hidden_size=arch.ffn,
        num_attention_heads=arch.heads, num_query_groups=arch.kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=arch.qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=arch.init_std, perform_initialization=init, use_cpu_initialization=cpu,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=pcfg.tensor_parallel, pipeline_model_parallel_size=pcfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=pcfg.sequence_parallel,
        context_parallel_size=pcfg.context_parallel, calculate_per_token_loss=True,
        bias_activation_fusion=not cpu, bias_dropout_fusion=not cpu, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        cross_entropy_loss_fusion=False, **recompute,
    )


def _no_grad_through_padding(pad_id: int):
    """Forward hook for VocabParallelEmbedding: positions holding `pad_id` pass no gradient to the table.

    This is nn.Embedding(padding_idx=pad_token_id) semantics, which HF Llama/Qwen2 use: the pad row never trains.
    It matters: the pad row is often all zeros, and a zero input makes every RMSNorm's gradient scale by
    1/sqrt(eps) (1e3 per norm), so one pad token gives that row a gradient around 1e12 and wrecks the global norm.
    Under sequence parallelism the output is (T/tp, b, h), already reduce-scattered, so the mask is sliced alike.
    """

    def hook(module, inputs, output):
        mask_BT = inputs[0] == pad_id
        if not bool(mask_BT.any()):
            return output
        if getattr(module, "reduce_scatter_embeddings", False):
            tp, rank = module.tp_group.size(), module.tp_group.rank()
            mask = mask_BT.transpose(0, 1).chunk(tp, dim=0)[rank].unsqueeze(-1)
        else:
            mask = mask_BT.unsqueeze(-1)
        return torch.where(mask, output.detach(), output)

    return hook


def _mark_tensor_parallel_weights(model) -> None:
    """Tag TP-split weights the way megatron's initialisers would.

    With `perform_initialization=False` (we load weights instead) megatron's local TP layers never call
    `set_tensor_model_parallel_attributes`, so their weights look replicated: the grad-norm then counts only TP rank
    0's shards (measured: 2.68 instead of 4.04 at TP=2) and checkpoint/optimizer logic treats them as duplicates.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        dim = 1 if isinstance(module, RowParallelLinear) else 0
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            weight = getattr(module, "weight", None)
            if weight is not None and not hasattr(weight, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(weight, True, dim, 1)


def build_model_chunks(arch: HFArch, config, *, vocab_multiple: int = 1, use_te: bool | None = None,
                       head: str = "lm") -> list:
    """One GPTModel per virtual pipeline stage held by this rank (a list of length 1 without VPP).

    head="lm": the vocab-parallel output layer (logits). head="score": a `ScoreHead` (one scalar per token) in its
    place on the last stage, nothing tied to the embedding (a reward model has no LM head)."""
    if head not in ("lm", "score"):
        raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    use_te = te_available() if use_te is None else use_te
    spec = layer_spec(use_te)
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        model = GPTModel(
            config=config, transformer_layer_spec=_block_spec(spec, config, vp_stage, use_te),
            vocab_size=padded_vocab_size(arch.vocab, config.tensor_model_parallel_size, vocab_multiple),
            max_sequence_length=arch.max_positions,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=arch.tied and head == "lm", position_embedding_type="rope",
            rotary_base=arch.rope_theta, rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0, parallel_output=True, vp_stage=vp_stage,
        )
        if head == "score" and model.post_process:
            model.output_layer = ScoreHead(config, arch.hidden)  # frees the (Vp/tp, D) output layer GPTModel built
        _mark_tensor_parallel_weights(model)
        if model.pre_process and arch.pad_token_id is not None:
            model.embedding.word_embeddings.register_forward_hook(_no_grad_through_padding(arch.pad_token_id))
        chunks.append(model)
    return chunks
