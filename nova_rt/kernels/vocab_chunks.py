"""Streaming an LM head's vocabulary in chunks: byte budgets and chunk plans, input checks, and the PyTorch chunk
math shared by fused_linear_logprobs (its torch path, and the backward's chunk loop on both paths) and
topk_select.reference_topk.

Legend: T tokens, D model dim, V vocab, K top-k ids per token, Vc vocab columns of one chunk.

A chunk is a (T, Vc) block of logits z = hidden_TD @ weight_VD[v0:v1].T, made by one GEMM into a reused buffer; its
width comes from a byte budget (`plan`), so the memory an op adds beyond its inputs and outputs does not grow with V.
`torch_fwd` folds the chunks into an online logsumexp (and entropy), picking out label and top-k logits on the way.
The math and the memory figures are in nova_rt/kernels/fused_linear_logprobs.py.

Tests and the memory benchmark patch `chunk_cols`, `rows_per_block`, `workspace_bytes` and `device_kind` here; the
modules that use them call them through this module (`vocab_chunks.plan(...)`), so a patch reaches every caller.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- budgets and plans
# "Extra" memory: what the op allocates beyond its inputs, the O(T) tensors saved for backward and the gradients it
# returns. Chunks are sized in bytes from one budget; fused_linear_logprobs_bwd has the numbers at the target size.
EXTRA_BUDGET = 88 * 2**20  # d hidden low bits (16-bit inputs, T x D bytes) + chunk workspace
WORKSPACE_CAP = {"cuda": 64 * 2**20, "cpu": 24 * 2**20}  # chunk workspace at most this (CPU: see chunk_cols)
WORKSPACE_FLOOR = 8 * 2**20
TOPK_ROW_BYTES = 32  # per top-k id in a row block: in-chunk mask, int64 column, gathered/scattered values
DH_ROW_BYTES = 8  # per d hidden element in a torch-path row block: the chunk's fp32 contribution + an int32 word


def device_kind(device: torch.device) -> str:
    """'cuda' or 'cpu': which budget and code path apply. The meta-tensor memory measurement patches this."""
    return "cuda" if device.type == "cuda" else "cpu"


def workspace_bytes(device: torch.device, reserved: int = 0) -> int:
    """Bytes for chunk temporaries: the extra budget minus `reserved` (the d hidden low bits), capped, floored."""
    return max(WORKSPACE_FLOOR, min(WORKSPACE_CAP[device_kind(device)], EXTRA_BUDGET - reserved))


def chunk_cols(T: int, V: int, workspace: int, bytes_per_elem: int) -> int:
    """Vocab columns per chunk so that T x Vc elements of `bytes_per_elem` bytes fit `workspace` (at least 64).

    On CPU smaller chunks fit cache better (softmax passes over V at T=1024, 1 thread: 0.08 s with 8 MB chunks,
    0.16 s with 32 MB) but cost more OpenMP regions, and on a 2-core machine shared with other jobs each region can
    wait a time slice (T=1024, V=49152, fp32, 2 threads at load ~20: fwd+bwd 5.2 s CPU time with 8 MB chunks,
    3.5 s with 32 MB, eager 2.5 s). The GEMMs are indifferent (0.71 vs 0.77 s per pass). With byte budgets: a 24 MiB
    CPU cap keeps the 4096 columns of before at T=1024 in bf16 (6 bytes per element); at T=1024, D=576, V=49152,
    bf16, 1 thread, a 32 MiB cap (5461 columns, 22 MB fp32 temporaries) took fwd 0.38 s + bwd 0.71 s CPU time
    against 0.21 + 0.54 s with 2730 or 4096 columns.
    """
    return int(min(V, max(64, workspace // max(1, T * bytes_per_elem))))


def rows_per_block(T: int, budget: int, bytes_per_row: int) -> int:
    """Token rows per block of row-blocked temporaries: as many as `budget` holds, at least 1, at most T."""
    return max(1, T if bytes_per_row == 0 else min(T, budget // bytes_per_row))


def plan(T: int, V: int, ws: int, esz: int, tmp: int, per_row: int = 0) -> tuple[int, int, int]:
    """(Vc, rows, left): vocab columns of the (T, Vc) chunk of esz-byte elements, token rows per block of the
    temporaries (tmp bytes per chunk element plus per_row bytes per row), and the workspace left beside the chunk.
    Temporaries for all T rows when they fit beside a chunk of >= 512 columns (or all of V); otherwise the chunk takes
    half the workspace and the temporaries are made for row blocks of the other half."""
    vc = chunk_cols(T, V, ws - T * per_row, esz + tmp)
    if (tmp or per_row) and (T * per_row >= ws or vc < min(V, 512)):
        vc = chunk_cols(T, V, ws // 2, esz)
    left = ws - T * vc * esz
    return vc, rows_per_block(T, left, vc * tmp + per_row), left


def row_blocks(T: int, rows: int):
    return (slice(r0, min(T, r0 + rows)) for r0 in range(0, T, rows))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tmp_bytes(dtype: torch.dtype, want_entropy: bool) -> int:
    """Bytes per chunk element of the torch path's temporaries: shifted logits (none when the chunk is already in the
    compute dtype: shifted in place) and, with entropy, a second compute-dtype tensor."""
    csz = compute_dtype(dtype).itemsize
    return (0 if dtype.itemsize == csz else csz) + (csz if want_entropy else 0)


def online_update(m, s, b, z, inv_tau: float, first: bool) -> None:
    """Fold chunk rows z (rows, Vc) into the running (m, s, B) of those rows, in place; the Triton kernel's recurrence.

    m: running max, s = sum exp(z - m), B = sum exp(z - m) (z - m) <= 0 (b is None without entropy). Sums of same-sign
    terms keep fp32 accurate: lse = m + log s and H = log s - B / s are formed once at the end (merging per-chunk
    lse/H instead loses ~1 ulp of lse per chunk into H). z is the raw GEMM output (input dtype): the 1/tau scale, the
    shift and the upcast are one op (on a shared CPU every extra pass is another OpenMP region to wait on), written
    over z when z is already in the compute dtype.
    """
    cdt = m.dtype
    m_c = z.amax(dim=1).to(cdt) * inv_tau
    m_new = m_c if first else torch.maximum(m, m_c)
    d = torch.add(-m_new[:, None], z, alpha=inv_tau, out=z if z.dtype == cdt else None)  # z / tau - m_new
    if b is not None:
        e = torch.exp(d)
        s_c = e.sum(dim=1)
        b_c = d.mul_(e).sum(dim=1)  # in place: vecdot(e, d) would make one more (rows, Vc) temporary
    else:
        s_c = d.exp_().sum(dim=1)
    if first:
        m.copy_(m_new)
        s.copy_(s_c)
        if b is not None:
            b.copy_(b_c)
        return
    scale = torch.exp(m - m_new)
    if b is not None:
        b.copy_(scale * (b + (m - m_new) * s) + b_c)
    s.mul_(scale).add_(s_c)
    m.copy_(m_new)


def gather_chunk(z_TVc, idx, v0, v1):
    """z[t, idx[t, j]] for ids inside [v0, v1), else 0. idx: (T, J) int64."""
    inside = (idx >= v0) & (idx < v1)
    vals = z_TVc.gather(1, (idx - v0).clamp_(0, v1 - v0 - 1))
    return torch.where(inside, vals, 0.0)


def torch_fwd(hidden_TD, weight_VD, labels_T, topk_ids_TK, inv_tau: float, want_entropy: bool):
    """Chunked PyTorch forward -> (logprobs_T, entropy_T or None, topk_logits_TK or None, lse_T); all in cdt.

    One (T, Vc) buffer takes every chunk's GEMM; the compute-dtype temporaries are made for row blocks of it, so
    both fit the workspace (at T=16k, bf16 with entropy on CUDA: Vc=1024 and blocks of 4096 rows, 64 MiB in all).
    """
    T, V = hidden_TD.shape[0], weight_VD.shape[0]
    dev, cdt = hidden_TD.device, compute_dtype(hidden_TD.dtype)
    K = 0 if topk_ids_TK is None else topk_ids_TK.shape[1]
    esz, tmp = hidden_TD.dtype.itemsize, tmp_bytes(hidden_TD.dtype, want_entropy)
    ws = workspace_bytes(dev)
    vc, rows, _ = plan(T, V, ws, esz, tmp, K * TOPK_ROW_BYTES)
    m, s = torch.empty(T, dtype=cdt, device=dev), torch.empty(T, dtype=cdt, device=dev)
    b = torch.empty(T, dtype=cdt, device=dev) if want_entropy else None
    zl = torch.zeros((T, 1), dtype=cdt, device=dev)
    zk = None if topk_ids_TK is None else torch.zeros(topk_ids_TK.shape, dtype=cdt, device=dev)
    zbuf = hidden_TD.new_empty(T * vc)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = torch.mm(hidden_TD, weight_VD[v0:v1].T, out=zbuf[: T * (v1 - v0)].view(T, v1 - v0))
        for r in row_blocks(T, rows):
            zl[r] += gather_chunk(z[r], labels_T[r, None], v0, v1).to(cdt) * inv_tau
            if zk is not None:
                zk[r] += gather_chunk(z[r], topk_ids_TK[r], v0, v1).to(cdt) * inv_tau
            online_update(m[r], s[r], None if b is None else b[r], z[r], inv_tau, first=v0 == 0)
    lse = m + torch.log(s)
    ent = torch.log(s) - b / s if want_entropy else None
    logp = torch.where(labels_T != IGNORE_INDEX, zl[:, 0] - lse, 0.0)
    return logp, ent, zk, lse


# ----------------------------------------------------------------------------------------------- backward chunk math
def dz_torch(z, lse, c1, ge, gl, labels, v0, v1, inv_tau):
    """dz / tau in the compute dtype for rows z (rows, Vc) of one raw logits chunk; written over z if z is in it."""
    logp = torch.add(-lse[:, None], z, alpha=inv_tau, out=z if z.dtype == lse.dtype else None)
    coef = c1[:, None] if ge is None else torch.addcmul(c1[:, None], logp, ge[:, None], value=-1.0)
    dz = logp.exp_().mul_(coef)
    scatter_chunk(dz, labels[:, None], gl[:, None], v0, v1)
    return dz


def scatter_chunk(dz, idx, src, v0, v1):
    inside = (idx >= v0) & (idx < v1)
    dz.scatter_add_(1, (idx - v0).clamp_(0, v1 - v0 - 1), torch.where(inside, src, 0.0).to(dz.dtype))


def split24(acc, hi, lo) -> None:
    """Store fp32 `acc` rounded to nearest at bit 8: bits 31..16 into hi (int16), 15..8 into lo (uint8); clobbers
    acc. Ties round away from zero; a carry into the exponent is the correct rounding. No temporaries: the casts to
    uint8 and int16 keep the low byte and the (in-range) shifted value."""
    bits = acc.view(torch.int32).add_(0x80).bitwise_right_shift_(8)
    lo.copy_(bits)
    hi.copy_(bits.bitwise_right_shift_(8))


def join24(hi, lo):
    """The fp32 value stored by `split24` (low 8 bits zero): one int32 temporary."""
    bits = hi.to(torch.int32).bitwise_left_shift_(16)
    return bits.add_(lo, alpha=256).view(torch.float32)  # the low 16 bits of bits are zero: + is |


# ----------------------------------------------------------------------------------------------- input checks
def check_inputs(hidden, weight, labels, topk_ids, temperature, impl):
    """Shapes, dtypes, devices and temperature (static facts, checked before the op)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (T, D) and weight (V, D); got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    allowed = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if impl == "torch" else ())
    if hidden.dtype != weight.dtype or hidden.dtype not in allowed:
        raise TypeError(f"hidden and weight must share a dtype in {allowed}; got {hidden.dtype}, {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden ({hidden.device}) and weight ({weight.device}) must be on one device")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels is not None:
        if labels.shape != (hidden.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 of shape ({hidden.shape[0]},); got {labels.dtype} "
                             f"{tuple(labels.shape)}")
    if topk_ids is not None:
        if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_ids.dtype != torch.int64:
            raise ValueError(f"topk_ids must be int64 of shape (T={hidden.shape[0]}, K); got {topk_ids.dtype} "
                             f"{tuple(topk_ids.shape)}")


def check_values(labels, topk_ids, V: int) -> None:
    """Range checks on ids. Run inside the custom op, where data-dependent control flow does not break
    torch.compile; on CUDA they are device-side asserts (no host sync)."""
    bad_labels = ((labels >= V) | ((labels < 0) & (labels != IGNORE_INDEX))).any()
    bad_ids = ((topk_ids < 0) | (topk_ids >= V)).any() if topk_ids is not None else None
    if labels.is_cuda:
        torch._assert_async(~bad_labels, f"labels must lie in [0, {V}) or equal {IGNORE_INDEX}")
        if bad_ids is not None:
            torch._assert_async(~bad_ids, f"topk_ids must lie in [0, {V})")
        return
    if bool(bad_labels):
        raise ValueError(f"labels must lie in [0, {V}) or equal {IGNORE_INDEX}")
    if bad_ids is not None and bool(bad_ids):
        raise ValueError(f"topk_ids must lie in [0, {V})")
