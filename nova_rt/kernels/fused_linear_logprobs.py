"""Token log-probs (plus entropy and top-k log-probs) straight from the LM head, never materialising (T, V) logits:
the SFT, DPO and GRPO losses need a few numbers per token, while eager log_softmax(hidden @ W.T) keeps T x V fp32
logits and as much again for their gradient.

With z = hidden @ weight.T / tau: logprobs[t] = z[t, y_t] - lse[t] (0 and no gradient where y_t == -100),
entropy[t] = -sum_v p log p, topk_logprobs[t, k] = z[t, ids[t, k]] - lse[t].
Both passes walk the vocabulary in chunks of Vc columns against all T tokens with an online softmax; the backward
recomputes each logits chunk, writes d weight per chunk and accumulates d hidden (fp32, or 24-bit for 16-bit inputs).
Extra memory is budgeted in bytes (vocab_chunks.EXTRA_BUDGET). `impl=`: "auto" (Triton for CUDA tensors, PyTorch
otherwise), "triton" or "torch". The gradient, memory and kernels: docs/kernels.md#fused_linear_logprobs.
Chunk plans, byte budgets, input checks and the PyTorch chunk math: vocab_chunks.py; top-k ids: topk_select.py.

Legend: T tokens, D model dim, V vocab, K top-k ids per token, Vc vocab columns of one chunk.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nova_rt.kernels import resolve_impl, vocab_chunks
from nova_rt.kernels.vocab_chunks import IGNORE_INDEX

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _fused_linear_logprobs_fwd_kernel(
    H, W, LABELS, M_OUT, S_OUT, A_OUT, ZL_OUT, T, V, D, stride_h, stride_w, inv_tau, cols_per_split,
    HAS_ENT: tl.constexpr, CAST_F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (token block, vocab split): online max m, sum-exp s, B = sum e (z - m) and label logit."""
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    labels = tl.load(LABELS + rows, mask=rmask, other=-100)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    a = tl.zeros((BLOCK_T,), tl.float32)
    zl = tl.zeros((BLOCK_T,), tl.float32)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            h = tl.load(H + rows[:, None] * stride_h + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            w = tl.load(W + cols[None, :] * stride_w + dd[:, None], mask=dmask[:, None] & cmask[None, :], other=0.0)
            if CAST_F32:  # fp32 inputs, and always under the interpreter (its bf16/fp16 math is wrong or low-precision)
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        z = tl.where(cmask[None, :], acc * inv_tau, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        e = tl.exp(z - m_new[:, None])
        scale = tl.exp(m - m_new)
        s_old = s
        s = s * scale + tl.sum(e, axis=1)
        if HAS_ENT:  # rebase B from m to m_new: sum e' (z - m_new) = scale * (B + (m - m_new) * s_old)
            shift = (tl.where(m == float("-inf"), m_new, m) - m_new) * s_old  # 0 on the first tile, never inf*0
            a = scale * (a + shift) + tl.sum(e * tl.where(cmask[None, :], z - m_new[:, None], 0.0), axis=1)
        zl += tl.sum(tl.where((cols[None, :] == labels[:, None]) & cmask[None, :], z, 0.0), axis=1)
        m = m_new
    out = pid_s * T + rows
    tl.store(M_OUT + out, m, mask=rmask)
    tl.store(S_OUT + out, s, mask=rmask)
    tl.store(ZL_OUT + out, zl, mask=rmask)
    if HAS_ENT:
        tl.store(A_OUT + out, a, mask=rmask)


@triton.jit
def _fused_linear_logprobs_gather_kernel(H, W, IDS, OUT, K, D, stride_h, stride_w, BLOCK_K: tl.constexpr,
                                         BLOCK_D: tl.constexpr):
    """OUT[t, k] = hidden[t] . weight[ids[t, k]] (fp32 accumulate): the logits of the given top-k ids."""
    t, pid_k = tl.program_id(0), tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    ids = tl.load(IDS + t * K + ks, mask=kmask, other=0)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(H + t * stride_h + dd, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(W + ids[:, None] * stride_w + dd[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    tl.store(OUT + t * K + ks, acc, mask=kmask)


@triton.jit
def _fused_linear_logprobs_bwd_kernel(Z, DZ, LSE, C1, GE, GL, LABELS, T, VC, v0, inv_tau,
                                      HAS_ENT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """dz = p * (c1 - ge * log p) + gl * onehot(label) on one (T, Vc) chunk of unscaled logits; row coefs pre-scaled."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask, cmask = rows < T, cols < VC
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * VC + cols[None, :]
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    c1 = tl.load(C1 + rows, mask=rmask, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    if HAS_ENT:
        ge = tl.load(GE + rows, mask=rmask, other=0.0)
        dz = p * (c1[:, None] - ge[:, None] * logp)
    else:
        dz = p * c1[:, None]
    labels = tl.load(LABELS + rows, mask=rmask, other=-100)
    gl = tl.load(GL + rows, mask=rmask, other=0.0)
    dz += tl.where((cols[None, :] + v0) == labels[:, None], gl[:, None], 0.0)
    tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)


@triton.jit
def _fused_linear_logprobs_dh_kernel(DZ, W, HI, LO, DH, T, VC, D, stride_wv, stride_wd, FIRST: tl.constexpr,
                                     LAST: tl.constexpr, CAST_F32: tl.constexpr, BLOCK_T: tl.constexpr,
                                     BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """d hidden tile += dz (T, Vc) @ w_c (Vc, D), summed in fp32 registers; between chunks the running sum is kept as
    fp32 rounded to 24 bits: the top 16 in HI (the returned d hidden's storage as int16), the next 8 in LO (uint8).
    FIRST: no running sum yet; LAST: write the rounded result in d hidden's dtype."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask, dmask = rows < T, dd < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for v0 in range(0, VC, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        vmask = vv < VC
        a = tl.load(DZ + rows[:, None] * VC + vv[None, :], mask=rmask[:, None] & vmask[None, :], other=0.0)
        b = tl.load(W + vv[:, None] * stride_wv + dd[None, :] * stride_wd, mask=vmask[:, None] & dmask[None, :],
                    other=0.0)
        if CAST_F32:  # under the interpreter (its 16-bit dot is wrong or low-precision)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    offs = rows[:, None] * D + dd[None, :]
    mask = rmask[:, None] & dmask[None, :]
    if not FIRST:
        hi = tl.load(HI + offs, mask=mask, other=0).to(tl.int32)  # sign-extends: the shift below restores the bits
        lo = tl.load(LO + offs, mask=mask, other=0).to(tl.int32)
        acc += ((hi << 16) | (lo << 8)).to(tl.float32, bitcast=True)
    if LAST:
        tl.store(DH + offs, acc.to(DH.dtype.element_ty), mask=mask)
    else:  # round to nearest at bit 8 (ties away from zero; a carry into the exponent is the correct rounding)
        bits = acc.to(tl.int32, bitcast=True) + 0x80
        tl.store(HI + offs, (bits >> 16).to(tl.int16), mask=mask)
        tl.store(LO + offs, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers
# Chunk sizes, byte budgets and the PyTorch chunk math are in vocab_chunks.py (shared with topk_select.py).
_FP32_ACC_MAX = vocab_chunks.EXTRA_BUDGET // 4  # torch path, 16-bit inputs: an fp32 d hidden buffer while it costs this

# Triton launch configurations: on CUDA, and under the interpreter (small, cheap blocks). Every CUDA entry is
# compiled for sm_90a without a GPU by nova_rt/kernels/aot.py (tests/kernels/test_sm90_compile.py): no spills,
# shared memory within 227 KB, wgmma in the 16-bit fwd and d hidden GEMMs. num_stages None = Triton's default (3).
_CUDA_TILES = {
    "fwd": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_D=64, num_warps=8),  # num_stages by dtype: _fwd_stages
    "gather": dict(BLOCK_K=32, BLOCK_D=128),
    "dz": dict(BLOCK_T=32, BLOCK_V=256),
    "dh": dict(BLOCK_T=128, BLOCK_D=128, BLOCK_V=64, num_warps=8, num_stages=3),
}
_INTERPRET_TILES = {
    "fwd": dict(BLOCK_T=16, BLOCK_V=32, BLOCK_D=32, num_warps=8),
    "gather": dict(BLOCK_K=64, BLOCK_D=32),
    "dz": dict(BLOCK_T=32, BLOCK_V=64),
    "dh": dict(BLOCK_T=16, BLOCK_D=32, BLOCK_V=32, num_warps=8, num_stages=3),
}
_TILES = _INTERPRET_TILES if _INTERPRET else _CUDA_TILES
# Spill-store bytes ptxas 13 (triton 3.7.1, sm_90a) reports and the compile test allows, by (kind, dtype): the fp32
# forward's 128 x 128 fp32 tile on FMA units runs at 255 registers (120 B without entropy, 256 B with it).
_SPILL_ALLOWANCE = {("fwd", "fp32"): 256}


def _fwd_stages(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float32 else 3  # fp32 tiles: 3 stages overflow SMEM


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def triton_fwd(hidden_TD, weight_VD, labels_T, topk_ids_TK, inv_tau: float, want_entropy: bool, v_splits=None):
    """Fused Triton forward; same return convention as `vocab_chunks.torch_fwd` (fp32). v_splits: vocab splits per
    token block.
    Allocates O(T) partials (4 x splits x T fp32) and the (T, K) top-k logits only."""
    T, D = hidden_TD.shape
    V = weight_VD.shape[0]
    h, w, labels_T = hidden_TD.contiguous(), weight_VD.contiguous(), labels_T.contiguous()
    if T == 0:
        return vocab_chunks.torch_fwd(h, w, labels_T, topk_ids_TK, inv_tau, want_entropy)
    block_t, block_v, block_d = (_TILES["fwd"][k] for k in ("BLOCK_T", "BLOCK_V", "BLOCK_D"))
    n_tblk = triton.cdiv(T, block_t)
    if v_splits is None:
        v_splits = max(1, min(triton.cdiv(2 * _sm_count(h.device), n_tblk), triton.cdiv(V, 4 * block_v)))
    cols = triton.cdiv(triton.cdiv(V, v_splits), block_v) * block_v
    v_splits = triton.cdiv(V, cols)
    part = torch.empty((4, v_splits, T), dtype=torch.float32, device=h.device)
    cast = _INTERPRET or h.dtype == torch.float32
    _fused_linear_logprobs_fwd_kernel[(n_tblk, v_splits)](
        h, w, labels_T, part[0], part[1], part[2], part[3], T, V, D, h.stride(0), w.stride(0), inv_tau, cols,
        HAS_ENT=want_entropy, CAST_F32=cast, BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=_TILES["fwd"]["num_warps"], num_stages=_fwd_stages(h.dtype))
    m_s, s_s, b_s, zl_s = part.unbind(0)
    m = m_s.amax(0)
    wgt = torch.exp(m_s - m)
    s = (s_s * wgt).sum(0)
    lse = m + torch.log(s)
    ent = None
    if want_entropy:  # rebase each split's B from its own max to the global one, then H = log s - B / s
        b = (wgt * (b_s + (m_s - m) * s_s)).sum(0)
        ent = torch.log(s) - b / s
    logp = torch.where(labels_T != IGNORE_INDEX, zl_s.sum(0) - lse, 0.0)
    zk = None
    if topk_ids_TK is not None:
        K = topk_ids_TK.shape[1]
        zk = torch.empty((T, K), dtype=torch.float32, device=h.device)
        if K > 0:
            block_k = _TILES["gather"]["BLOCK_K"]
            _fused_linear_logprobs_gather_kernel[(T, triton.cdiv(K, block_k))](
                h, w, topk_ids_TK.contiguous(), zk, K, D, h.stride(0), w.stride(0), **_TILES["gather"])
        zk *= inv_tau
    return logp, ent, zk, lse


def _dz_triton(z, dz, lse, c1, ge, gl, labels, v0, inv_tau):
    bt, bv = _TILES["dz"]["BLOCK_T"], _TILES["dz"]["BLOCK_V"]
    _fused_linear_logprobs_bwd_kernel[(triton.cdiv(z.shape[0], bt), triton.cdiv(z.shape[1], bv))](
        z, dz, lse, c1, ge if ge is not None else c1, gl, labels, z.shape[0], z.shape[1], v0, inv_tau,
        HAS_ENT=ge is not None, **_TILES["dz"])


def _dz_chunk(z, v0, v1, rows, rowvecs, topk_ids_TK, g_topk, inv_tau, use_triton):
    """Overwrite the raw logits chunk z (T, Vc) with dz / tau in z's dtype, computed in fp32 row block by row block.

    rowvecs: (lse, c1, ge or None, gl, labels), per-token vectors. The Triton kernel reads z and writes dz in place
    when no top-k one-hots must be added first; otherwise a row block of fp32 dz takes them before the rounding.
    """
    if use_triton and topk_ids_TK is None:
        _dz_triton(z, z, *rowvecs, v0, inv_tau)
        return
    for r in vocab_chunks.row_blocks(z.shape[0], rows):
        lse, c1, ge, gl, labels = (None if x is None else x[r] for x in rowvecs)
        if use_triton:
            dz = z[r] if z.dtype == torch.float32 else torch.empty(z[r].shape, dtype=torch.float32, device=z.device)
            _dz_triton(z[r], dz, lse, c1, ge, gl, labels, v0, inv_tau)
        else:
            dz = vocab_chunks.dz_torch(z[r], lse, c1, ge, gl, labels, v0, v1, inv_tau)
        if topk_ids_TK is not None:
            vocab_chunks.scatter_chunk(dz, topk_ids_TK[r], g_topk[r].to(dz.dtype) * inv_tau, v0, v1)
        if dz.dtype != z.dtype:
            z[r].copy_(dz)
        del dz  # before the next block allocates its own


def _dh_update(dh, lo, dz, w_c, first: bool, last: bool, rows: int, use_triton: bool) -> None:
    """d hidden += dz @ w_c for one chunk: in place in the returned fp32/fp64 d hidden or in an fp32 buffer (lo is
    None), else through the 24-bit split (top 16 bits in d hidden itself, low 8 in lo) that the last chunk rounds."""
    if lo is None and dh.dtype == dz.dtype:
        if first:
            torch.mm(dz, w_c, out=dh)
        else:
            dh.addmm_(dz, w_c)
        return
    # cuBLAS hands out the fp32 sums; CPU 16-bit GEMMs round them
    f32_out = vocab_chunks.device_kind(dz.device) == "cuda"
    if lo is None:  # an fp32 buffer for a 16-bit chunk (torch path, small T x D): two passes per chunk
        part = torch.mm(dz, w_c, out_dtype=torch.float32) if f32_out else torch.mm(dz, w_c)
        if first:
            dh.copy_(part)
        else:
            dh.add_(part)
        return
    T, D = dh.shape
    if use_triton:
        bt, bd = _TILES["dh"]["BLOCK_T"], _TILES["dh"]["BLOCK_D"]
        _fused_linear_logprobs_dh_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
            dz, w_c, dh.view(torch.int16), lo, dh, T, dz.shape[1], D, w_c.stride(0), w_c.stride(1), FIRST=first,
            LAST=last, CAST_F32=_INTERPRET, **_TILES["dh"])
        return
    hi = dh.view(torch.int16)
    for r in vocab_chunks.row_blocks(T, rows):
        part = torch.mm(dz[r], w_c, out_dtype=torch.float32) if f32_out else torch.mm(dz[r], w_c)
        acc = part.float() if first else vocab_chunks.join24(hi[r], lo[r]).add_(part)
        if last:
            dh[r].copy_(acc)
        else:
            vocab_chunks.split24(acc, hi[r], lo[r])
        del part, acc  # before the next block allocates its own


def fused_linear_logprobs_bwd(hidden_TD, weight_VD, labels_T, topk_ids_TK, lse_T, ent_T, g_logp, g_ent, g_topk,
                              inv_tau: float, need_h: bool, need_w: bool, use_triton: bool):
    """(d hidden or None, d weight or None) by vocab chunks, within vocab_chunks.EXTRA_BUDGET bytes beyond inputs and
    outputs.

    Per chunk of Vc vocab rows, all T tokens: z = hidden @ w_c.T (GEMM, into one reused (T, Vc) buffer); dz written
    over z (Triton kernel in place, or torch in row blocks of fp32 temporaries); d weight rows = dz.T @ hidden (GEMM
    with the full-T reduction, written once into the returned gradient); d hidden += dz @ w_c (GEMM). GEMMs per
    fwd+bwd: 1 forward + 3 backward (logits recompute, d weight, d hidden), 8 T D V FLOPs, as before this design.

    The accumulator. d hidden sums over V and d weight over T; one of the sums is split over chunks and its partial
    sums live between chunks. Splitting T (token-outer loop) would keep fp32 partials of all V x D weight rows
    (2.5 GB at the target). Splitting V (vocab-outer, here) keeps T x D partials of d hidden until the last chunk, in
    any order of the chunks; fp32 partials cost 4 bytes per element of which the returned 16-bit d hidden can hold
    2, so the other 2 x T x D bytes (134 MB at the target, 2.7% of the bf16 logits) would exceed the budget by
    themselves. With 16-bit inputs the partials are therefore fp32 rounded to 24 bits (16 mantissa bits): the top
    16 bits in the returned d hidden's own storage, the low 8 in a T x D uint8 buffer (67 MB, 1.35%); only the torch
    path keeps a plain fp32 buffer while that costs <= _FP32_ACC_MAX (22 MiB: T x D <= 2.9M). Each chunk's
    dz @ w_c is summed in fp32 (Triton: registers, the running sum decoded and re-encoded in the GEMM epilogue;
    torch on CUDA: cuBLAS fp32 output; torch on CPU: rounded to the input dtype, as eager's one GEMM is), added in
    fp32 and rounded at bit 8; the last chunk rounds to the input dtype. Per chunk the partial sum gains <= 2^-16
    relative error (half an ulp at 16 significant bits; a bf16 accumulator: 2^-8): after 200 chunks a random walk of
    ~ sqrt(200) 2^-16 / sqrt(3) = 1.2e-4 of the partial sums, 1/18 of the bf16 rounding (2^-8 / sqrt(3)) that
    eager's result also takes. fp32/fp64 inputs accumulate in place in the returned d hidden.

    Peak bytes beyond inputs, outputs and gradients over forward + backward at the target (T=16384, D=4096,
    V=152064; bf16 logits 4.98 GB, 2% = 95.0 MiB), measured on meta tensors by `bench_fused_linear_logprobs.py --meta`:
        Triton bf16: 64 MiB low bits + 24 MiB chunk (Vc=768) + O(T) = 88.2 MiB = 1.86% of bf16 logits (0.93% fp32)
        Triton fp32: 64 MiB chunk (Vc=1024) + O(T) = 64.2 MiB = 1.35% (0.68%)
        torch bf16: 88.2 MiB = 1.86% with the CUDA or the CPU budget (both leave 24 MiB beside the low bits)
        torch fp32: 64.7 MiB = 1.36% (CUDA), 24.7 MiB = 0.52% (CPU); with 500 top-k ids: at most 88.3 MiB anywhere
    Before: 512 MiB (10.8%) Triton bf16, 384 MiB fp32: an fp32 T x D accumulator (256 MiB), z and dz chunks of 2^25
    elements (64 + 64 MiB bf16) and the bf16 `dz @ w_c` (128 MiB); 576-704 MiB on the torch path (400 on CPU).
    Cost: the d hidden pass reads and writes 3 bytes of state per T x D element per chunk; 198 chunks at the target
    move 80 GB (~24 ms at 3.35 TB/s, against ~90 ms of backward GEMMs on an H100; the old fp32 buffer moved 60 GB
    over 74 chunks). h is read by two GEMMs per chunk (53 GB). Not measured on a GPU here.
    """
    T, D = hidden_TD.shape
    V = weight_VD.shape[0]
    cdt, dev = lse_T.dtype, hidden_TD.device
    labels_T = labels_T.contiguous()
    gl = torch.where(labels_T != IGNORE_INDEX, g_logp.to(cdt), 0.0) * inv_tau
    big_g = gl if topk_ids_TK is None else gl + g_topk.sum(1, dtype=cdt) * inv_tau
    ge = None if g_ent is None else g_ent.to(cdt) * inv_tau
    c1 = -big_g if ge is None else -(ge * ent_T + big_g)
    # 16-bit d hidden: the 24-bit split, or on the torch path a plain fp32 buffer while it is cheap (fewer passes,
    # which matters on a shared CPU where each pass is an OpenMP region to wait on)
    acc32 = need_h and hidden_TD.dtype.itemsize == 2 and not use_triton and 0 < 8 * T * D <= _FP32_ACC_MAX
    split = need_h and hidden_TD.dtype.itemsize == 2 and not acc32
    dh_dtype = torch.float32 if acc32 else hidden_TD.dtype
    dh = torch.empty(hidden_TD.shape, dtype=dh_dtype, device=dev) if need_h else None
    lo = torch.empty(hidden_TD.shape, dtype=torch.uint8, device=dev) if split else None
    dw = torch.empty(weight_VD.shape, dtype=weight_VD.dtype, device=dev) if need_w else None
    if T == 0:
        return dh, (None if dw is None else dw.zero_())
    esz, K = hidden_TD.dtype.itemsize, 0 if topk_ids_TK is None else topk_ids_TK.shape[1]
    if use_triton:  # fp32 row blocks only to add top-k one-hots to a 16-bit chunk
        tmp = 0 if topk_ids_TK is None or esz == 4 else 4
    else:
        tmp = vocab_chunks.tmp_bytes(hidden_TD.dtype, ge is not None)
    reserved = lo.numel() if split else 8 * T * D if acc32 else 0  # acc32: the buffer + dz @ w_c
    ws = vocab_chunks.workspace_bytes(dev, reserved=reserved)
    vc, rows_dz, left = vocab_chunks.plan(T, V, ws, esz, tmp, K * vocab_chunks.TOPK_ROW_BYTES)
    rows_dh = vocab_chunks.rows_per_block(T, left, D * vocab_chunks.DH_ROW_BYTES)
    zbuf = hidden_TD.new_empty(T * vc)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        w_c = weight_VD[v0:v1]
        z = torch.mm(hidden_TD, w_c.T, out=zbuf[: T * (v1 - v0)].view(T, v1 - v0))
        _dz_chunk(z, v0, v1, rows_dz, (lse_T, c1, ge, gl, labels_T), topk_ids_TK, g_topk, inv_tau, use_triton)
        if need_w:
            torch.mm(z.T, hidden_TD, out=dw[v0:v1])
        if need_h:
            _dh_update(dh, lo, z, w_c, v0 == 0, v1 == V, rows_dh, use_triton)
    if acc32:
        del zbuf, z
        dh = dh.to(hidden_TD.dtype)
    return dh, dw


# ----------------------------------------------------------------------------------------------- binding
@torch.library.custom_op("nova_rt::fused_linear_logprobs", mutates_args=())
def _fll_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None,
            inv_tau: float, want_entropy: bool, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                           torch.Tensor, torch.Tensor]:
    vocab_chunks.check_values(labels, topk_ids, weight.shape[0])
    return _forward(hidden, weight, labels, topk_ids, inv_tau, want_entropy, use_triton)


def _forward(hidden, weight, labels, topk_ids, inv_tau: float, want_entropy: bool, use_triton: bool):
    """The op's forward less the id checks: (logprobs, entropy, topk logprobs, lse, entropy saved for backward)."""
    fwd = triton_fwd if use_triton else vocab_chunks.torch_fwd
    logp, ent, zk, lse = fwd(hidden, weight, labels, topk_ids, inv_tau, want_entropy)
    T = hidden.shape[0]
    ent = ent if want_entropy else lse.new_empty((0,))
    topk = zk.sub_(lse[:, None]).float() if zk is not None else hidden.new_empty((T, 0), dtype=torch.float32)
    return logp.float(), ent.to(torch.float32, copy=True), topk, lse, ent  # the last two: saved for backward


@_fll_op.register_fake
def _(hidden, weight, labels, topk_ids, inv_tau, want_entropy, use_triton):
    T = hidden.shape[0]
    cdt = vocab_chunks.compute_dtype(hidden.dtype)
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((T,), **f32), hidden.new_empty((T if want_entropy else 0,), **f32),
            hidden.new_empty((T, 0 if topk_ids is None else topk_ids.shape[1]), **f32),
            hidden.new_empty((T,), dtype=cdt), hidden.new_empty((T if want_entropy else 0,), dtype=cdt))


@torch.library.custom_op("nova_rt::fused_linear_logprobs_bwd", mutates_args=())
def _fll_bwd_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None,
                lse: torch.Tensor, ent_saved: torch.Tensor, g_logp: torch.Tensor, g_ent: torch.Tensor | None,
                g_topk: torch.Tensor | None, inv_tau: float, need_h: bool, need_w: bool,
                use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dh, dw = fused_linear_logprobs_bwd(hidden, weight, labels, topk_ids, lse, ent_saved, g_logp, g_ent, g_topk,
                                       inv_tau, need_h, need_w, use_triton)
    return (dh if dh is not None else hidden.new_empty((0,)), dw if dw is not None else weight.new_empty((0,)))


@_fll_bwd_op.register_fake
def _(hidden, weight, labels, topk_ids, lse, ent_saved, g_logp, g_ent, g_topk, inv_tau, need_h, need_w, use_triton):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_w else weight.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, topk_ids, ctx.inv_tau, ctx.want_entropy, ctx.use_triton = inputs
    ctx.has_topk = topk_ids is not None
    ctx.save_for_backward(hidden, weight, labels, topk_ids if ctx.has_topk else None, output[3], output[4])


def _backward(ctx, g_logp, g_ent, g_topk, _g_lse, _g_ent_saved):
    hidden, weight, labels, topk_ids, lse, ent_saved = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return None, None, None, None, None, None, None
    if g_logp is None:
        g_logp = torch.zeros_like(lse, dtype=torch.float32)
    g_ent = g_ent if ctx.want_entropy else None
    if ctx.has_topk and g_topk is None:
        g_topk = torch.zeros(topk_ids.shape, dtype=torch.float32, device=topk_ids.device)
    dh, dw = _fll_bwd_op(hidden, weight, labels, topk_ids, lse, ent_saved, g_logp, g_ent,
                         g_topk if ctx.has_topk else None, ctx.inv_tau, need_h, need_w, ctx.use_triton)
    return (dh if need_h else None), (dw if need_w else None), None, None, None, None, None


_fll_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public API
def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          temperature: float = 1.0, return_entropy: bool = False,
                          topk_ids: torch.Tensor | None = None, impl: str = "auto") -> dict:
    """Log-probs of `labels` under softmax(hidden @ weight.T / temperature), without (T, V) logits.

    hidden: (T, D), weight: (V, D), same dtype (fp32/fp16/bf16; fp64 on the torch path); labels: (T,) int64 with
    -100 = ignore (logprob 0.0, no gradient). Returns {"logprobs": (T,) fp32} plus "entropy": (T,) fp32 when
    return_entropy, and "topk_logprobs": (T, K) fp32 (full-vocab log-softmax at topk_ids (T, K) int64) when given.
    Differentiable w.r.t. hidden and weight through every output.
    """
    impl = resolve_impl(impl, hidden, weight)
    vocab_chunks.check_inputs(hidden, weight, labels, topk_ids, temperature, impl)
    logp, ent, topk, _, _ = _fll_op(hidden, weight, labels, topk_ids, 1.0 / float(temperature),
                                    bool(return_entropy), impl == "triton")
    out = {"logprobs": logp}
    if return_entropy:
        out["entropy"] = ent
    if topk_ids is not None:
        out["topk_logprobs"] = topk
    return out
