"""Attention over packed documents (varlen), FlashAttention-2 style in Triton, with a PyTorch path for CPU: tokens
attend only within their own document, as flash_attn_varlen_func with cu_seqlens_q == cu_seqlens_k, and nothing
T x T is ever stored.

For each document s = [a, b), query head n and its kv head j = n // G (GQA):
    S[t, u] = scale * q_TNH[t, n] . k_TKH[u, j]        for t, u in [a, b), u <= t when causal
    P = softmax_u(S),  out_TNH[t, n] = sum_u P[t, u] v_TKH[u, j],  lse_NT[n, t] = logsumexp_u S[t, u]
Triton: blocks of BM query rows that never straddle two documents, heaviest first; online softmax (exp2, fp32);
backward recomputes P from lse (delta, dK/dV per kv block with the GQA reduction in registers, dQ per query block).
Backward math, block table and memory: docs/kernels.md#packed_attention. Torch path and input checks:
packed_attention_torch.py.

Legend: T packed tokens, S documents, N query heads, K kv heads, G = N / K, H head dim (padded to the power of two
HP inside kernels), BM / BN query / key block rows.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl

from nova_rt.kernels import resolve_impl
from nova_rt.kernels.packed_attention_torch import check_inputs, packed_attention_torch, torch_impl

__all__ = ["packed_attention", "packed_attention_torch", "packed_attention_fwd", "packed_attention_bwd"]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------- Triton path
@triton.jit
def _load_tile(base, rows, stride, offs_d, n_rows, HEAD_DIM: tl.constexpr, HP: tl.constexpr):
    """(rows, HP) tile; rows >= n_rows (outside the document) and padded head-dim columns read as 0."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if HEAD_DIM == HP:  # row-only mask: constant along the contiguous dim, so loads stay vectorised
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _store_tile(base, rows, stride, offs_d, n_rows, tile, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _block_of(TABLE, n_slots, CU, slot):
    """(document start, document length, block index) of this program; length -1 for an unused slot."""
    doc = tl.load(TABLE + slot)
    blk = tl.load(TABLE + n_slots + slot)
    start = tl.load(CU + tl.maximum(doc, 0))
    length = tl.where(doc >= 0, tl.load(CU + tl.maximum(doc, 0) + 1) - start, -1)
    return start.to(tl.int64), length, blk


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, offs_m, offs_d, L, lo, hi, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HP: tl.constexpr, MASK: tl.constexpr,
               CAUSAL: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, L, HEAD_DIM, HP)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
        if MASK:  # only the diagonal / ragged block pays for the mask
            keep = (offs_n < L)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, stride_kt, offs_d, L, HEAD_DIM, HP)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _packed_attention_fwd_kernel(Q, K, V, OUT, LSE, CU, TABLE, n_slots, T, stride_qt, stride_kt, qk_scale,
                                 G: tl.constexpr, HEAD_DIM: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    head = tl.program_id(1)
    start, L, blk = _block_of(TABLE, n_slots, CU, tl.program_id(0))
    if L < 0:
        return
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HP)
    q = _load_tile(Q + start * stride_qt + head * HEAD_DIM, offs_m, stride_qt, offs_d, L, HEAD_DIM, HP)
    kv_off = start * stride_kt + (head // G) * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HP], tl.float32)
    if CAUSAL:  # keys before the block need no mask; the diagonal block does
        lo = blk * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, L)
    else:  # whole key blocks, then the ragged last one
        lo = (L // BLOCK_N) * BLOCK_N
        hi = L
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + kv_off, V + kv_off, stride_kt, offs_m, offs_d, L, 0, lo,
                               qk_scale, BLOCK_N, HEAD_DIM, HP, False, CAUSAL, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + kv_off, V + kv_off, stride_kt, offs_m, offs_d, L, lo, hi,
                               qk_scale, BLOCK_N, HEAD_DIM, HP, True, CAUSAL, PREC)
    _store_tile(OUT + start * stride_qt + head * HEAD_DIM, offs_m, stride_qt, offs_d, L, acc / l_i[:, None], HEAD_DIM)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of the scaled scores
    tl.store(LSE + head.to(tl.int64) * T + start + offs_m, lse, mask=offs_m < L)


@triton.jit
def _packed_attention_bwd_preprocess_kernel(OUT, DO, DELTA, T, stride_t, HEAD_DIM: tl.constexpr, HP: tl.constexpr,
                                            BLOCK_M: tl.constexpr):
    head = tl.program_id(1)
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, HP)
    o = _load_tile(OUT + start * stride_t + head * HEAD_DIM, rows, stride_t, offs_d, T - start, HEAD_DIM, HP)
    do = _load_tile(DO + start * stride_t + head * HEAD_DIM, rows, stride_t, offs_d, T - start, HEAD_DIM, HP)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * T + start + rows, delta, mask=rows < T - start)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, offs_n, offs_d, L, lo, hi, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HP: tl.constexpr, MASK: tl.constexpr,
                PREC: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Query rows past the document read q = dO = lse = delta = 0, so they add exactly 0 to dK and dV.
        q = _load_tile(q_base, offs_m, stride_qt, offs_d, L, HEAD_DIM, HP)
        lse = tl.load(lse_base + offs_m, mask=offs_m < L, other=0.0) * 1.4426950408889634
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])  # (BN, BM)
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = _load_tile(do_base, offs_m, stride_qt, offs_d, L, HEAD_DIM, HP)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _packed_attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, TABLE, n_slots, T, stride_qt, stride_kt,
                                      qk_scale, sm_scale, G: tl.constexpr, HEAD_DIM: tl.constexpr, HP: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                                      PREC: tl.constexpr):
    kv_head = tl.program_id(1)
    start, L, blk = _block_of(TABLE, n_slots, CU, tl.program_id(0))
    if L < 0:
        return
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HP)
    kv_off = start * stride_kt + kv_head * HEAD_DIM
    k = _load_tile(K + kv_off, offs_n, stride_kt, offs_d, L, HEAD_DIM, HP)
    v = _load_tile(V + kv_off, offs_n, stride_kt, offs_d, L, HEAD_DIM, HP)
    dk = tl.zeros([BLOCK_N, HP], tl.float32)
    dv = tl.zeros([BLOCK_N, HP], tl.float32)
    if CAUSAL:  # earlier queries never see this block; [lo, mid) is the masked diagonal, [mid, L) needs no mask
        lo = blk * BLOCK_N
        mid = tl.minimum(lo + BLOCK_N, L)
    else:
        lo = blk * 0
        mid = blk * 0
    for g in range(G):  # the G query heads sharing this kv head: GQA reduction in registers, no atomics
        head = kv_head * G + g
        q_off = start * stride_qt + head * HEAD_DIM
        lse_base = LSE + head.to(tl.int64) * T + start
        delta_base = DELTA + head.to(tl.int64) * T + start
        dk, dv = _dkdv_inner(dk, dv, k, v, Q + q_off, DO + q_off, lse_base, delta_base, stride_qt, offs_n, offs_d,
                             L, lo, mid, qk_scale, BLOCK_M, HEAD_DIM, HP, True, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q + q_off, DO + q_off, lse_base, delta_base, stride_qt, offs_n, offs_d,
                             L, mid, L, qk_scale, BLOCK_M, HEAD_DIM, HP, False, PREC)
    _store_tile(DK + kv_off, offs_n, stride_kt, offs_d, L, dk * sm_scale, HEAD_DIM)
    _store_tile(DV + kv_off, offs_n, stride_kt, offs_d, L, dv, HEAD_DIM)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, offs_m, offs_d, L, lo, hi, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HP: tl.constexpr, MASK: tl.constexpr,
              CAUSAL: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, L, HEAD_DIM, HP)
        v = _load_tile(v_base, offs_n, stride_kt, offs_d, L, HEAD_DIM, HP)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        if MASK:
            keep = (offs_n < L)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _packed_attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, TABLE, n_slots, T, stride_qt, stride_kt,
                                    qk_scale, sm_scale, G: tl.constexpr, HEAD_DIM: tl.constexpr, HP: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                                    PREC: tl.constexpr):
    head = tl.program_id(1)
    start, L, blk = _block_of(TABLE, n_slots, CU, tl.program_id(0))
    if L < 0:
        return
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HP)
    q_off = start * stride_qt + head * HEAD_DIM
    q = _load_tile(Q + q_off, offs_m, stride_qt, offs_d, L, HEAD_DIM, HP)
    do = _load_tile(DO + q_off, offs_m, stride_qt, offs_d, L, HEAD_DIM, HP)
    lse = tl.load(LSE + head.to(tl.int64) * T + start + offs_m, mask=offs_m < L, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head.to(tl.int64) * T + start + offs_m, mask=offs_m < L, other=0.0)
    kv_off = start * stride_kt + (head // G) * HEAD_DIM
    if CAUSAL:
        lo = blk * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, L)
    else:
        lo = (L // BLOCK_N) * BLOCK_N
        hi = L
    dq = tl.zeros([BLOCK_M, HP], tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K + kv_off, V + kv_off, stride_kt, offs_m, offs_d, L, 0, lo, qk_scale,
                   BLOCK_N, HEAD_DIM, HP, False, CAUSAL, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, K + kv_off, V + kv_off, stride_kt, offs_m, offs_d, L, lo, hi, qk_scale,
                   BLOCK_N, HEAD_DIM, HP, True, CAUSAL, PREC)
    _store_tile(DQ + q_off, offs_m, stride_qt, offs_d, L, dq * sm_scale, HEAD_DIM)


# ------------------------------------------------------------------------------------------------------- launchers
_tables: dict = {}  # (id(cu), version, block, causal, reverse) -> (weakref(cu), table, n_slots); reused across layers


def _block_table(cu_seqlens, T: int, block: int, causal: bool, reverse: bool) -> tuple[torch.Tensor, int]:
    """int32 (2, n_slots): document and block index of each program, heaviest first; document -1 = unused slot.

    n_slots = T // block + S bounds sum_s ceil(L_s / block), so the grid is known without a host sync. Causal work
    grows with the block index (queries) or shrinks with it (keys, `reverse`); non-causal work is the doc length.
    """
    key = (id(cu_seqlens), cu_seqlens._version, block, causal, reverse)
    hit = _tables.get(key)
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1], hit[2]
    S = cu_seqlens.numel() - 1
    nblk_S = (cu_seqlens.diff().long() + block - 1) // block
    ends_S = nblk_S.cumsum(0)
    n_slots = T // block + S
    slot = torch.arange(n_slots, device=cu_seqlens.device)
    doc = torch.searchsorted(ends_S, slot, right=True)
    valid, doc_c = doc < S, doc.clamp(max=S - 1)
    blk = slot - (ends_S - nblk_S)[doc_c]
    work = (nblk_S[doc_c] - blk if reverse else blk + 1) if causal else nblk_S[doc_c]
    order = torch.argsort(torch.where(valid, work, -1), descending=True, stable=True)
    table = torch.stack([torch.where(valid, doc, -1)[order], blk[order]]).to(torch.int32).contiguous()
    if len(_tables) >= 64:
        _tables.clear()
    _tables[key] = (weakref.ref(cu_seqlens), table, n_slots)
    return table, n_slots


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kind and padded head dim, picked so ptxas (sm_90a, triton 3.7.1 AOT
# compile, no GPU) reports few register spills; e.g. dK/dV H=128 at 64x128 keys spilled 812 B. fp32 (ieee dots on
# FMA units) is the exact path, not the fast one. Not yet timed. Every entry is compiled in CI by nova_rt/kernels/aot.py
# (causal and not, H = HP and H = 96, G = 4, the general-case specialisation): registers, spills and shared memory
# per entry in docs/benchmarks.md "sm_90 compile checks"; the spills it finds are the allowances below.
_CUDA_CONFIGS = {  # fp16 / bf16
    "fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (32, 32, 4, 2)},
    "dkdv": {64: (64, 128, 8, 2), 128: (32, 64, 8, 2), 256: (16, 32, 8, 2)},
    "dq": {64: (128, 64, 8, 2), 128: (128, 32, 8, 2), 256: (32, 32, 8, 2)},
}
_CUDA_CONFIGS_FP32 = {
    "fwd": {64: (64, 32, 8, 2), 128: (32, 16, 8, 2), 256: (32, 16, 8, 2)},
    "dkdv": {64: (16, 32, 4, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)},
    "dq": {64: (32, 32, 8, 2), 128: (32, 32, 4, 2), 256: (32, 16, 8, 2)},
}
# Checked by tests/kernels/test_sm90_compile.py (nova_rt/kernels/aot.py compiles every entry for sm_90a on CPU):
# spill-store bytes ptxas may report for an entry, keyed (table, kind, HP); and entries whose 16-bit tiles are too
# small for a warpgroup MMA (64 rows), so Triton emits Ampere-style mma.sync instead of wgmma (still tensor cores).
_SPILL_ALLOWANCE: dict[tuple[str, str, int], int] = {
    ("fp32", "fwd", 128): 4,  # H=96 causal (80 registers); H=128: 0 B
    ("fp32", "dkdv", 128): 32,  # H=96 causal 32 B, H=128 causal 28 B (128 registers at 8 warps); non-causal 0 B
    # non-causal H=128 at 4 warps: 255 registers, 1332 B (causal: 168 registers, 0 B). Compiled alternatives:
    # (32, 16, 4, 2) 113-116 registers and (32, 16, 8, 2) 74-76 registers, 0 B causal and not; (32, 32, 8, 2) 255
    # registers, ~500 B. To switch once a GPU has timed them (the fp32 path is the exact one, not the fast one).
    ("fp32", "dq", 128): 1332,
    ("fp32", "dkdv", 256): 60,  # non-causal (128 registers); causal 0 B
}
# H=256 16-bit tiles are 16-32 rows: mma.sync m16n8k16 (Ampere-style tensor cores, not wgmma). Larger tiles at
# H=256 need more shared memory and registers per row; untimed, so the small tiles stay.
_MMA_V2_CONFIGS: set[tuple[str, str, int]] = {("16bit", "fwd", 256), ("16bit", "dkdv", 256), ("16bit", "dq", 256)}


def _config(kind: str, HP: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """fwd/dq need BLOCK_M % BLOCK_N == 0, dkdv BLOCK_N % BLOCK_M == 0. On CPU: small, cheap interpreted blocks."""
    if device.type != "cuda":
        return {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind] + (4, 1)
    table = _CUDA_CONFIGS_FP32 if dtype == torch.float32 else _CUDA_CONFIGS
    return table[kind][max(64, HP)]


def _common(q_TNH, k_TKH, causal):
    T, N, H = q_TNH.shape
    HP = max(16, triton.next_power_of_2(H))
    prec = "ieee" if q_TNH.dtype == torch.float32 else "tf32"  # fp32 must not silently drop to tf32
    return T, N, H, dict(G=N // k_TKH.shape[1], HEAD_DIM=H, HP=HP, CAUSAL=causal, PREC=prec)


def packed_attention_fwd(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, cu_seqlens: torch.Tensor,
                         causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out_TNH (q's dtype) and lse_NT (fp32). No autograd."""
    q_TNH, k_TKH, v_TKH = q_TNH.contiguous(), k_TKH.contiguous(), v_TKH.contiguous()
    T, N, H, meta = _common(q_TNH, k_TKH, causal)
    out_TNH = torch.empty_like(q_TNH)
    lse_NT = torch.empty((N, T), dtype=torch.float32, device=q_TNH.device)
    if T == 0:
        return out_TNH, lse_NT
    bm, bn, warps, stages = _config("fwd", meta["HP"], q_TNH.dtype, q_TNH.device)
    table, n_slots = _block_table(cu_seqlens, T, bm, causal, reverse=False)
    _packed_attention_fwd_kernel[(n_slots, N)](
        q_TNH, k_TKH, v_TKH, out_TNH, lse_NT, cu_seqlens, table, n_slots, T, N * H, k_TKH.shape[1] * H,
        softmax_scale * _LOG2E, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta)
    return out_TNH, lse_NT


def packed_attention_bwd(do_TNH: torch.Tensor, q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor,
                         out_TNH: torch.Tensor, lse_NT: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                         softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (delta, dK/dV, dQ). Returns dq_TNH, dk_TKH, dv_TKH in the input dtype."""
    do_TNH, q_TNH, k_TKH, v_TKH, out_TNH = (x.contiguous() for x in (do_TNH, q_TNH, k_TKH, v_TKH, out_TNH))
    T, N, H, meta = _common(q_TNH, k_TKH, causal)
    K = k_TKH.shape[1]
    dq_TNH, dk_TKH, dv_TKH = torch.empty_like(q_TNH), torch.empty_like(k_TKH), torch.empty_like(v_TKH)
    if T == 0:
        return dq_TNH, dk_TKH, dv_TKH
    delta_NT = torch.empty((N, T), dtype=torch.float32, device=q_TNH.device)
    bm = _config("dq", meta["HP"], q_TNH.dtype, q_TNH.device)[0]
    _packed_attention_bwd_preprocess_kernel[(triton.cdiv(T, bm), N)](
        out_TNH, do_TNH, delta_NT, T, N * H, HEAD_DIM=H, HP=meta["HP"], BLOCK_M=bm)
    args = (cu_seqlens,)
    for kind in ("dkdv", "dq"):
        bm, bn, warps, stages = _config(kind, meta["HP"], q_TNH.dtype, q_TNH.device)
        table, n_slots = _block_table(cu_seqlens, T, bn if kind == "dkdv" else bm, causal, reverse=kind == "dkdv")
        tail = (*args, table, n_slots, T, N * H, K * H, softmax_scale * _LOG2E, softmax_scale)
        if kind == "dkdv":
            _packed_attention_bwd_dkdv_kernel[(n_slots, K)](
                q_TNH, k_TKH, v_TKH, do_TNH, lse_NT, delta_NT, dk_TKH, dv_TKH, *tail,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta)
        else:
            _packed_attention_bwd_dq_kernel[(n_slots, N)](
                q_TNH, k_TKH, v_TKH, do_TNH, lse_NT, delta_NT, dq_TNH, *tail,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta)
    return dq_TNH, dk_TKH, dv_TKH


# ------------------------------------------------------------------------------------------- binding + public op
@torch.library.custom_op("nova_rt::packed_attention_fwd", mutates_args=())
def _fwd_op(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return packed_attention_fwd(q_TNH, k_TKH, v_TKH, cu_seqlens, causal, softmax_scale)


@_fwd_op.register_fake
def _(q_TNH, k_TKH, v_TKH, cu_seqlens, causal, softmax_scale):
    T, N, _ = q_TNH.shape
    return q_TNH.new_empty(q_TNH.shape), q_TNH.new_empty((N, T), dtype=torch.float32)


@torch.library.custom_op("nova_rt::packed_attention_bwd", mutates_args=())
def _bwd_op(do_TNH: torch.Tensor, q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor,
            out_TNH: torch.Tensor, lse_NT: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return packed_attention_bwd(do_TNH, q_TNH, k_TKH, v_TKH, out_TNH, lse_NT, cu_seqlens, causal, softmax_scale)


@_bwd_op.register_fake
def _(do_TNH, q_TNH, k_TKH, v_TKH, out_TNH, lse_NT, cu_seqlens, causal, softmax_scale):
    return q_TNH.new_empty(q_TNH.shape), k_TKH.new_empty(k_TKH.shape), v_TKH.new_empty(v_TKH.shape)


def _setup_context(ctx, inputs, output):
    q_TNH, k_TKH, v_TKH, cu_seqlens, ctx.causal, ctx.softmax_scale = inputs
    out_TNH, lse_NT = output
    ctx.save_for_backward(q_TNH, k_TKH, v_TKH, out_TNH, lse_NT, cu_seqlens)


def _backward(ctx, do_TNH, _dlse_NT):
    q_TNH, k_TKH, v_TKH, out_TNH, lse_NT, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do_TNH, q_TNH, k_TKH, v_TKH, out_TNH, lse_NT, cu_seqlens, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def packed_attention(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, causal: bool = True, softmax_scale: float | None = None,
                     impl: str = "auto") -> torch.Tensor:
    """Attention within each packed document (flash_attn_varlen_func with cu_seqlens_q == cu_seqlens_k).

    q_TNH: (T, N, H); k_TKH, v_TKH: (T, K, H) with N % K == 0; cu_seqlens: int32 (S+1,), 0 = cu[0] <= ... <=
    cu[S] = T; max_seqlen: longest document (an upper bound is fine). softmax_scale defaults to 1/sqrt(H).
    impl: "auto" (Triton on CUDA, torch on CPU), "triton" (interpreter on CPU) or "torch".
    Returns (T, N, H) in q's dtype; differentiable w.r.t. q, k and v.
    """
    check_inputs(q_TNH, k_TKH, v_TKH, cu_seqlens, max_seqlen)
    H = q_TNH.shape[2]
    scale = 1.0 / math.sqrt(H) if softmax_scale is None else float(softmax_scale)
    if resolve_impl(impl, q_TNH, k_TKH, v_TKH) == "torch":
        return torch_impl(q_TNH, k_TKH, v_TKH, cu_seqlens, causal, scale)
    if q_TNH.dtype == torch.float64:
        raise TypeError("packed_attention: the Triton path takes fp16/bf16/fp32; use impl='torch' for fp64")
    if H > 256:
        raise ValueError(f"packed_attention: the Triton path supports head_dim <= 256, got {H}")
    return _fwd_op(q_TNH, k_TKH, v_TKH, cu_seqlens, causal, scale)[0]
