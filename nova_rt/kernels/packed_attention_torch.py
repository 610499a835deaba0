"""packed_attention's PyTorch path (CPU, and what the Triton path is first compared with) and the input checks both
paths run. Math, legend and the Triton kernels: nova_rt/kernels/packed_attention.py.

Consecutive short documents are grouped into windows of at most _WINDOW tokens, each one
F.scaled_dot_product_attention call with a block-diagonal mask; a longer document gets its own unmasked (is_causal)
call, so memory stays O(N * _WINDOW^2 + T) instead of O(N * T^2). Autograd comes from torch.

Legend: T packed tokens, S documents, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# Largest run of consecutive documents fused into one masked SDPA call. fwd+bwd on 2 CPU threads, T=4096, N=8, K=2,
# H=64: 300 docs 175/79/57/75/120 ms and 33 lognormal docs 88/84/76/83/116 ms for windows 1/64/128/256/512.
_WINDOW = 128


# ----------------------------------------------------------------------------------------------------- validation
_last_checked: list = [None, None]  # weakref to the last cu_seqlens whose values passed; its (_version, T, max_seqlen)


def check_inputs(q_TNH, k_TKH, v_TKH, cu_seqlens, max_seqlen) -> None:
    for name, t in (("q", q_TNH), ("k", k_TKH), ("v", v_TKH)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"packed_attention: {name} must be a 3-D tensor (tokens, heads, head_dim)")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"packed_attention: {name} dtype {t.dtype} is not fp16/bf16/fp32/fp64")
    if k_TKH.shape != v_TKH.shape:
        raise ValueError(f"packed_attention: k shape {tuple(k_TKH.shape)} != v shape {tuple(v_TKH.shape)}")
    (T, N, H), K = q_TNH.shape, k_TKH.shape[1]
    if k_TKH.shape[0] != T or k_TKH.shape[2] != H:
        raise ValueError(f"packed_attention: k/v shape {tuple(k_TKH.shape)} does not match q {tuple(q_TNH.shape)}")
    if K == 0 or N % K != 0:
        raise ValueError(f"packed_attention: q heads ({N}) must be a positive multiple of kv heads ({K})")
    if not q_TNH.dtype == k_TKH.dtype == v_TKH.dtype:
        raise TypeError(f"packed_attention: q, k, v dtypes differ ({q_TNH.dtype}, {k_TKH.dtype}, {v_TKH.dtype})")
    if not q_TNH.device == k_TKH.device == v_TKH.device == cu_seqlens.device:
        raise ValueError("packed_attention: q, k, v and cu_seqlens must be on the same device")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"packed_attention: cu_seqlens must be a 1-D int32 tensor (S+1,), got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"packed_attention: max_seqlen must be a positive int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return  # value checks need a host sync; eager calls (and the first compiled run's inputs) do them
    key = (cu_seqlens._version, T, max_seqlen)
    if _last_checked[0] is not None and _last_checked[0]() is cu_seqlens and _last_checked[1] == key:
        return  # values of this very tensor were checked already (one host sync per step, not per layer)
    lens = cu_seqlens.diff()
    first, last, min_len, max_len = torch.stack([cu_seqlens[0], cu_seqlens[-1], lens.min(), lens.max()]).tolist()
    if first != 0 or last != T:
        raise ValueError(f"packed_attention: cu_seqlens must start at 0 and end at T={T}, got {first}..{last}")
    if min_len < 0:
        raise ValueError("packed_attention: cu_seqlens must be non-decreasing")
    if max_len > max_seqlen:
        raise ValueError(f"packed_attention: a document has {max_len} tokens > max_seqlen={max_seqlen}")
    _last_checked[:] = [weakref.ref(cu_seqlens), key]


# ------------------------------------------------------------------------------------------------------ torch path
def _doc_windows(cu: list[int]) -> list[tuple[int, int]]:
    """Group consecutive documents [i, j) while their total length stays <= _WINDOW (a longer doc stands alone)."""
    windows, i, S = [], 0, len(cu) - 1
    while i < S:
        j = i + 1
        while j < S and cu[j + 1] - cu[i] <= _WINDOW:
            j += 1
        windows.append((i, j))
        i = j
    return windows


def packed_attention_torch(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, *, causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """PyTorch path (autograd from torch): one SDPA call per window of short documents or per long document."""
    check_inputs(q_TNH, k_TKH, v_TKH, cu_seqlens, max_seqlen)
    return torch_impl(q_TNH, k_TKH, v_TKH, cu_seqlens, causal, softmax_scale)


def torch_impl(q_TNH, k_TKH, v_TKH, cu_seqlens, causal, softmax_scale):
    cu, lens_S = cu_seqlens.tolist(), cu_seqlens.diff().long()
    outs = []
    for i, j in _doc_windows(cu):
        a, b = cu[i], cu[j]
        if a == b:
            continue
        # (1, heads, tokens, H): 4-D inputs reach the fused CPU kernel; 3-D ones fell back to a 10x slower path.
        q, k, v = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q_TNH, k_TKH, v_TKH))
        mask = None
        if j - i > 1:
            seg = torch.repeat_interleave(torch.arange(j - i, device=q.device), lens_S[i:j], output_size=b - a)
            mask = seg[:, None] == seg[None, :]
            if causal:
                mask = mask.tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=softmax_scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q_TNH.new_empty(q_TNH.shape)
    return torch.cat(outs).contiguous()
