"""Fused GRPO policy loss over flat response tokens: advantages, ratio, clipped surrogate, KL, aggregation and
d logprobs in one pass over the log-probs, deterministic (fixed-order reduce, no atomics), no (T,) index tensor.

    A_i  = (R_i - mean_g R) / (std_g R + 1e-4)   (adv_norm="none": R_i - mean_g R; or given);   a_t = A_i + tadv_t
    r_t  = exp(clamp(lp_t - old_t, -20, 20)),    pg_t = -min(r_t a_t, clip(r_t, 1 - eps_low, 1 + eps_high) a_t)
    loss = sum_t w_t (c_t pg_t + beta kl_t)      kl_t: k1 | k2 | k3;  c_t: is_weights (TIS), a constant
    w_t  = 1 / T | 1 / (n_nonempty L_i) | 1 / (B max_i L_i)   (token-mean | seq-mean-token-mean | ...-sum-norm)

Triton: an advantage kernel (one program), a loss kernel per block of tokens (each finds its response by binary
search over cu_seqlens and writes d logprobs in the same pass), a reduce kernel; backward scales the saved d logprobs.
Clamps, equal rewards, TIS, stats and memory traffic: docs/kernels.md#grpo_loss; the oracle: reference.py.

Legend: T response tokens (flat), B responses, G group size (adjacent responses), P token blocks (partials).
"""

import torch
import triton
import triton.language as tl

from nova_rt.kernels import resolve_impl

_KL_MODES = {"k1": 1, "k2": 2, "k3": 3}
_AGG_MODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum-norm": 2}
_ADV_NORMS = ("std", "none")
_LOG_RATIO_CLAMP = 20.0
_K3_MAX = 10.0
_STD_EPS = 1e-4
STAT_NAMES = ("clip_frac", "kl_mean", "adv_mean", "adv_std", "ratio_mean")


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _group_adv(R_B, i, m, G, bessel, NORM_STD: tl.constexpr):
    """Advantage of responses i (a vector): deviations taken against the group's first reward, so equal -> 0."""
    base = (i // G) * G
    r0 = tl.load(R_B + base, mask=m, other=0.0).to(tl.float32)
    dsum = tl.zeros_like(r0)
    for j in range(G):
        dsum += tl.load(R_B + base + j, mask=m, other=0.0).to(tl.float32) - r0
    mdev = dsum / G
    adv = (tl.load(R_B + i, mask=m, other=0.0).to(tl.float32) - r0) - mdev
    if NORM_STD:
        ss = tl.zeros_like(r0)
        for j in range(G):
            d = (tl.load(R_B + base + j, mask=m, other=0.0).to(tl.float32) - r0) - mdev
            ss += d * d
        adv = adv / (tl.sqrt(ss / bessel) + 1e-4)
    return tl.where(m, adv, 0.0)


@triton.jit
def _grpo_adv_kernel(R_B, GIVEN_B, CU, ADV_B, W_B, STATS, B, G, bessel, inv_tokens,
                     AGG: tl.constexpr, NORM_STD: tl.constexpr, HAS_GIVEN: tl.constexpr, BLOCK_B: tl.constexpr):
    offs = tl.arange(0, BLOCK_B)
    n_ne = tl.zeros([BLOCK_B], tl.int32)
    lmax = tl.zeros([BLOCK_B], tl.int32)
    for start in range(0, B, BLOCK_B):
        i = start + offs
        m = i < B
        ln = (tl.load(CU + i + 1, mask=m, other=0) - tl.load(CU + i, mask=m, other=0)).to(tl.int32)
        n_ne += (ln > 0).to(tl.int32)
        lmax = tl.maximum(lmax, ln)
    n_nonempty = tl.maximum(tl.sum(n_ne, 0), 1).to(tl.float32)
    longest = tl.maximum(tl.max(lmax, 0), 1).to(tl.float32)
    asum = tl.zeros([BLOCK_B], tl.float32)
    asq = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, B, BLOCK_B):
        i = start + offs
        m = i < B
        if HAS_GIVEN:  # precomputed advantages, taken as they are
            adv = tl.load(GIVEN_B + i, mask=m, other=0.0).to(tl.float32)
        else:
            adv = _group_adv(R_B, i, m, G, bessel, NORM_STD)
        if AGG == 0:
            w = tl.zeros([BLOCK_B], tl.float32) + inv_tokens
        elif AGG == 1:
            ln = (tl.load(CU + i + 1, mask=m, other=0) - tl.load(CU + i, mask=m, other=0)).to(tl.float32)
            w = tl.where(ln > 0, 1.0 / (n_nonempty * tl.maximum(ln, 1.0)), 0.0)
        else:
            w = tl.zeros([BLOCK_B], tl.float32) + 1.0 / (longest * B)
        tl.store(ADV_B + i, adv, mask=m)
        tl.store(W_B + i, w, mask=m)
        asum += adv
        asq += adv * adv
    mean = tl.sum(asum, 0) / B
    tl.store(STATS + 2, mean)
    tl.store(STATS + 3, tl.sqrt(tl.maximum(tl.sum(asq, 0) / B - mean * mean, 0.0)))


@triton.jit
def _search_seq(CU, t, lo, hi, n_iter):
    """Largest i in [lo, hi) with cu[i] <= t, given cu[lo] <= t < cu[hi]: binary search with a fixed trip count
    (trips after hi - lo == 1 change nothing, so n_iter may exceed ceil(log2(hi - lo)))."""
    for _ in range(n_iter):
        mid = (lo + hi) // 2
        go = tl.load(CU + mid) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _kl_estimator(lp, ref, KL: tl.constexpr):
    """Per-token KL estimate of pi_theta against pi_ref and its derivative in lp."""
    if KL == 1:
        kl = lp - ref
        dkl = tl.zeros_like(lp) + 1.0
    elif KL == 2:
        kl = 0.5 * (lp - ref) * (lp - ref)
        dkl = lp - ref
    else:
        d = ref - lp
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(dc)
        raw = e - dc - 1.0
        kl = tl.minimum(raw, 10.0)
        keep = (d >= -20.0) & (d <= 20.0) & (raw <= 10.0)
        dkl = tl.where(keep, 1.0 - e, 0.0)
    return kl, dkl


@triton.jit
def _grpo_loss_fwd_kernel(LP_T, OLD_T, REF_T, TADV_T, ISW_T, CU, ADV_B, W_B, DLP_T, PART_4P,
                          T, B, P, n_search, eps_low, eps_high, beta,
                          HAS_REF: tl.constexpr, HAS_TADV: tl.constexpr, HAS_ISW: tl.constexpr, KL: tl.constexpr,
                          WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    m = t < T
    full = pid * BLOCK_T + BLOCK_T <= T
    # Streaming loads first, so they are in flight during the cu_seqlens search. Full blocks load unmasked: a
    # `t < T` mask with T % 16 != 0 would stop 16-B vector loads.
    if full:
        lp = tl.load(LP_T + t).to(tl.float32)
        old = tl.load(OLD_T + t).to(tl.float32)
        ref = tl.load(REF_T + t).to(tl.float32) if HAS_REF else lp
        tadv = tl.load(TADV_T + t).to(tl.float32) if HAS_TADV else tl.zeros_like(lp)
        isw = tl.load(ISW_T + t).to(tl.float32) if HAS_ISW else tl.zeros_like(lp) + 1.0
    else:
        lp = tl.load(LP_T + t, mask=m, other=0.0).to(tl.float32)
        old = tl.load(OLD_T + t, mask=m, other=0.0).to(tl.float32)
        ref = tl.load(REF_T + t, mask=m, other=0.0).to(tl.float32) if HAS_REF else lp
        tadv = tl.load(TADV_T + t, mask=m, other=0.0).to(tl.float32) if HAS_TADV else tl.zeros_like(lp)
        isw = tl.load(ISW_T + t, mask=m, other=0.0).to(tl.float32) if HAS_ISW else tl.zeros_like(lp) + 1.0
    # Token -> response: a 2-lane search bounds the block's responses [s0, s1], then the per-token search needs
    # ceil(log2(s1 - s0 + 1)) trips (1-2 when responses are longer than a block) instead of log2(B); +1 guards a
    # low log2 estimate (extra trips are no-ops).
    ends = tl.minimum(pid * BLOCK_T + tl.arange(0, 2) * (BLOCK_T - 1), T - 1)
    s01 = _search_seq(CU, ends, tl.zeros_like(ends), tl.zeros_like(ends) + B, n_search)
    s0, s1 = tl.min(s01, 0), tl.max(s01, 0)
    n_local = tl.ceil(tl.log2((s1 + 1 - s0).to(tl.float32))).to(tl.int32) + 1
    seq = _search_seq(CU, t, tl.zeros_like(t) + s0, tl.zeros_like(t) + s1 + 1, n_local)
    a = tl.load(ADV_B + seq, mask=m, other=0.0) + tadv
    w = tl.load(W_B + seq, mask=m, other=0.0)
    x = lp - old
    ratio = tl.exp(tl.minimum(tl.maximum(x, -20.0), 20.0))
    pg1 = -a * ratio
    pg2 = -a * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    clipped = pg2 > pg1
    # c * max(pg1, pg2): the TIS weight scales the surrogate (not the KL below) and has no gradient.
    loss = isw * tl.maximum(pg1, pg2)
    # d(-a r)/d lp = -a r = pg1, unless the clipped term is the max or the log-ratio clamp is active.
    dloss = isw * tl.where(clipped | (x < -20.0) | (x > 20.0), 0.0, pg1)
    kl = tl.zeros_like(lp)
    if HAS_REF:
        kl, dkl = _kl_estimator(lp, ref, KL)
        kl = tl.where(m, kl, 0.0)
        loss += beta * kl
        dloss += beta * dkl
    if WRITE_GRAD:
        g = (w * dloss).to(DLP_T.dtype.element_ty)
        if full:
            tl.store(DLP_T + t, g)
        else:
            tl.store(DLP_T + t, g, mask=m)
    tl.store(PART_4P + pid, tl.sum(tl.where(m, w * loss, 0.0), 0))
    tl.store(PART_4P + P + pid, tl.sum(tl.where(m & clipped, 1.0, 0.0), 0))
    tl.store(PART_4P + 2 * P + pid, tl.sum(kl, 0))
    tl.store(PART_4P + 3 * P + pid, tl.sum(tl.where(m, ratio, 0.0), 0))


@triton.jit
def _grpo_reduce_kernel(PART_4P, LOSS, STATS, P, inv_tokens, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    acc_loss = tl.zeros([BLOCK_P], tl.float32)
    acc_clip = tl.zeros([BLOCK_P], tl.float32)
    acc_kl = tl.zeros([BLOCK_P], tl.float32)
    acc_ratio = tl.zeros([BLOCK_P], tl.float32)
    for start in range(0, P, BLOCK_P):
        p = start + offs
        m = p < P
        acc_loss += tl.load(PART_4P + p, mask=m, other=0.0)
        acc_clip += tl.load(PART_4P + P + p, mask=m, other=0.0)
        acc_kl += tl.load(PART_4P + 2 * P + p, mask=m, other=0.0)
        acc_ratio += tl.load(PART_4P + 3 * P + p, mask=m, other=0.0)
    tl.store(LOSS, tl.sum(acc_loss, 0))
    tl.store(STATS + 0, tl.sum(acc_clip, 0) * inv_tokens)
    tl.store(STATS + 1, tl.sum(acc_kl, 0) * inv_tokens)
    tl.store(STATS + 4, tl.sum(acc_ratio, 0) * inv_tokens)


# ----------------------------------------------------------------------------------------------- launcher
# Launch configuration on CUDA. 1024 tokens per program: 8 fp32 per thread at 4 warps (two 16-B loads per array),
# ~4 programs per SM at 0.5M tokens. BLOCK_B is the next power of two of B within the range; BLOCK_P the partials
# tile. Every choice is compiled for sm_90a without a GPU by nova_rt/kernels/aot.py (tests/kernels/
# test_sm90_compile.py): no spills, shared memory within 227 KB.
_CUDA_BLOCK_T = 1024
_CPU_BLOCK_T = 128
_FWD_WARPS = 4
_BLOCK_B_RANGE = (16, 1024)
_BLOCK_P = 256
# Spill-store bytes ptxas 13 (triton 3.7.1, sm_90a) reports and the compile test allows: the advantage kernel at
# BLOCK_B=1024 (seq-mean-token-sum-norm, std: 8 B) and the fp16 forward without a reference (8 B).
_SPILL_ALLOWANCE = {("adv", 1024): 8, ("fwd", "fp16"): 8}


def grpo_loss_fwd(logprobs_T, old_logprobs_T, ref_logprobs_T, rewards_B, cu_seqlens, token_adv_T, group_size: int,
                  eps_low: float, eps_high: float, beta: float, kl: str, agg: str, adv_norm: str,
                  write_grad: bool = True, block_t: int | None = None, block_b: int | None = None,
                  block_p: int = _BLOCK_P, is_weights_T: torch.Tensor | None = None,
                  advantages_B: torch.Tensor | None = None):
    """Launch the three forward kernels; no autograd. Returns (loss 0-d fp32, dlp (T,) or (0,), stats (5,) fp32).

    dlp is d loss / d logprobs in the logprobs dtype (empty when write_grad is False); stats follow STAT_NAMES.
    block_t / block_b / block_p override the block sizes (tests use small ones to reach several blocks and tiles).
    """
    T, B = logprobs_T.numel(), rewards_B.numel()
    dev = logprobs_T.device
    on_gpu = logprobs_T.is_cuda
    block_t = block_t or min(_CUDA_BLOCK_T if on_gpu else _CPU_BLOCK_T, max(16, triton.next_power_of_2(max(T, 1))))
    block_b = block_b or min(_BLOCK_B_RANGE[1], max(_BLOCK_B_RANGE[0], triton.next_power_of_2(B)))
    n_blocks = triton.cdiv(T, block_t)
    adv_B = torch.empty(B, device=dev, dtype=torch.float32)
    w_B = torch.empty(B, device=dev, dtype=torch.float32)
    stats = torch.empty(5, device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    dlp_T = torch.empty(T if write_grad else 0, device=dev, dtype=logprobs_T.dtype)
    part_4P = torch.empty(4 * max(n_blocks, 1), device=dev, dtype=torch.float32)
    inv_tokens = 1.0 / max(T, 1)
    has_given = advantages_B is not None
    _grpo_adv_kernel[(1,)](rewards_B, advantages_B if has_given else rewards_B, cu_seqlens, adv_B, w_B, stats, B,
                           group_size, float(max(group_size - 1, 1)), inv_tokens, AGG=_AGG_MODES[agg],
                           NORM_STD=adv_norm == "std", HAS_GIVEN=has_given, BLOCK_B=block_b)
    if n_blocks > 0:
        has_ref, has_tadv, has_isw = ref_logprobs_T is not None, token_adv_T is not None, is_weights_T is not None
        _grpo_loss_fwd_kernel[(n_blocks,)](
            logprobs_T, old_logprobs_T, ref_logprobs_T if has_ref else logprobs_T,
            token_adv_T if has_tadv else logprobs_T, is_weights_T if has_isw else logprobs_T, cu_seqlens, adv_B,
            w_B, dlp_T if write_grad else logprobs_T, part_4P, T, B, n_blocks, (B - 1).bit_length(), eps_low,
            eps_high, beta, HAS_REF=has_ref, HAS_TADV=has_tadv, HAS_ISW=has_isw, KL=_KL_MODES[kl],
            WRITE_GRAD=write_grad, BLOCK_T=block_t, num_warps=_FWD_WARPS)
    _grpo_reduce_kernel[(1,)](part_4P, loss, stats, n_blocks, inv_tokens, BLOCK_P=block_p)
    return loss, dlp_T, stats


# ----------------------------------------------------------------------------------------------- binding
@torch.library.custom_op("nova_rt::grpo_loss", mutates_args=())
def _grpo_loss_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                  rewards: torch.Tensor, cu_seqlens: torch.Tensor, token_adv: torch.Tensor | None, group_size: int,
                  eps_low: float, eps_high: float, beta: float, kl: str, agg: str, adv_norm: str,
                  write_grad: bool, is_weights: torch.Tensor | None,
                  advantages: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return grpo_loss_fwd(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, token_adv, group_size,
                         eps_low, eps_high, beta, kl, agg, adv_norm, write_grad, is_weights_T=is_weights,
                         advantages_B=advantages)


@_grpo_loss_op.register_fake
def _(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, token_adv, group_size, eps_low, eps_high, beta,
      kl, agg, adv_norm, write_grad, is_weights, advantages=None):
    T = logprobs.shape[0] if write_grad else 0
    return (logprobs.new_empty((), dtype=torch.float32), logprobs.new_empty(T),
            logprobs.new_empty(5, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    _loss, dlp_T, stats = output
    ctx.mark_non_differentiable(dlp_T, stats)
    ctx.save_for_backward(dlp_T)


def _backward(ctx, grad_loss, _grad_dlp, _grad_stats):
    (dlp_T,) = ctx.saved_tensors
    # One elementwise pass (2E bytes/token); a 0-d fp32 factor keeps dlp's dtype.
    return (dlp_T * grad_loss,) + (None,) * 15


_grpo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- torch path
def _group_advantage_torch(rewards_B: torch.Tensor, group_size: int, adv_norm: str) -> torch.Tensor:
    r_BG = rewards_B.float().view(-1, group_size)
    d_BG = r_BG - r_BG[:, :1]  # against the first reward: equal rewards give exactly zero deviation
    dev_BG = d_BG - d_BG.mean(dim=1, keepdim=True)
    if adv_norm == "std":
        std = (dev_BG.square().sum(dim=1, keepdim=True) / max(group_size - 1, 1)).sqrt()
        dev_BG = dev_BG / (std + _STD_EPS)
    return dev_BG.reshape(-1)


def _kl_torch(lp_T: torch.Tensor, ref_T: torch.Tensor, kl: str) -> torch.Tensor:
    if kl == "k1":
        return lp_T - ref_T
    if kl == "k2":
        return 0.5 * (lp_T - ref_T).square()
    d = (ref_T - lp_T).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (d.exp() - d - 1.0).clamp(max=_K3_MAX)


def _agg_weights_torch(len_B: torch.Tensor, T: int, agg: str) -> torch.Tensor:
    B = len_B.numel()
    if agg == "token-mean":
        return torch.full((B,), 1.0 / max(T, 1), device=len_B.device)
    if agg == "seq-mean-token-mean":
        n_nonempty = (len_B > 0).sum().clamp(min=1)
        return torch.where(len_B > 0, 1.0 / (n_nonempty * len_B.clamp(min=1)), 0.0).float()
    return (1.0 / (B * len_B.max().clamp(min=1))).float().expand(B)


def grpo_loss_torch(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, *, eps_low=0.2,
                    eps_high=0.2, beta=0.0, kl="k3", agg="token-mean", adv_norm="std", token_adv=None,
                    is_weights=None, advantages=None):
    """Eager PyTorch path (the CPU path): same math as the module docstring, fp32 compute, autograd for d logprobs."""
    _check_inputs(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, beta, kl, agg, adv_norm,
                  token_adv, is_weights, advantages)
    T, dev = logprobs.shape[0], logprobs.device
    cu = cu_seqlens.long()
    seq_T = torch.searchsorted(cu[1:], torch.arange(T, device=dev), right=True)
    adv_B = advantages.detach().float() if advantages is not None else _group_advantage_torch(rewards, group_size,
                                                                                                adv_norm)
    a_T = adv_B[seq_T] + (token_adv.float() if token_adv is not None else 0.0)
    lp_T = logprobs.float()
    log_ratio = (lp_T - old_logprobs.float()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio_T = log_ratio.exp()
    pg1_T = -a_T * ratio_T
    pg2_T = -a_T * ratio_T.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_T = torch.maximum(pg1_T, pg2_T)
    if is_weights is not None:  # TIS: scales the surrogate only, as a constant
        loss_T = loss_T * is_weights.detach().float()
    kl_T = _kl_torch(lp_T, ref_logprobs.float(), kl) if ref_logprobs is not None else torch.zeros_like(lp_T)
    if ref_logprobs is not None and beta != 0.0:
        loss_T = loss_T + beta * kl_T
    w_B = _agg_weights_torch(cu[1:] - cu[:-1], T, agg)
    loss = (loss_T * w_B[seq_T]).sum()
    inv_tokens = 1.0 / max(T, 1)
    stats = {
        "clip_frac": (pg2_T > pg1_T).float().sum().detach() * inv_tokens,
        "kl_mean": kl_T.sum().detach() * inv_tokens,
        "adv_mean": adv_B.mean().detach(),
        "adv_std": adv_B.std(correction=0).detach(),
        "ratio_mean": ratio_T.sum().detach() * inv_tokens,
    }
    return loss, stats


# ----------------------------------------------------------------------------------------------- public op
def _check_inputs(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, beta, kl, agg, adv_norm,
                  token_adv, is_weights=None, advantages=None) -> None:
    if kl not in _KL_MODES:
        raise ValueError(f"kl must be one of {sorted(_KL_MODES)}, got {kl!r}")
    if agg not in _AGG_MODES:
        raise ValueError(f"agg must be one of {sorted(_AGG_MODES)}, got {agg!r}")
    if adv_norm not in _ADV_NORMS:
        raise ValueError(f"adv_norm must be one of {_ADV_NORMS}, got {adv_norm!r}")
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be flat (T,), got shape {tuple(logprobs.shape)}")
    T = logprobs.shape[0]
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("token_adv", token_adv),
                    ("is_weights", is_weights)):
        if x is not None and tuple(x.shape) != (T,):
            raise ValueError(f"{name} must have shape ({T},) like logprobs, got {tuple(x.shape)}")
        if x is not None and x.device != logprobs.device:
            raise ValueError(f"{name} is on {x.device}, logprobs on {logprobs.device}")
    if ref_logprobs is None and beta != 0.0:
        raise ValueError(f"ref_logprobs is None but beta={beta}: the KL term needs reference log-probs")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (B,) tensor, got shape {tuple(rewards.shape)}")
    B = rewards.numel()
    if not isinstance(group_size, int) or group_size < 1 or B % group_size != 0:
        raise ValueError(f"B={B} responses (rewards) must be a multiple of group_size={group_size} (a positive int)")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cu_seqlens.shape) != (B + 1,):
        raise ValueError(f"cu_seqlens must be int32/int64 of shape ({B + 1},) = B + 1, "
                         f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if advantages is not None and tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must have shape ({B},) like rewards, got {tuple(advantages.shape)}")
    for name, x in (("rewards", rewards), ("cu_seqlens", cu_seqlens), ("advantages", advantages)):
        if x is None:
            continue
        if x.device != logprobs.device:
            raise ValueError(f"{name} is on {x.device}, logprobs on {logprobs.device}")
    # Value checks need a host sync (and a graph break under torch.compile): CPU tensors in eager mode only.
    if not cu_seqlens.is_cuda and not torch.compiler.is_compiling():
        cu = cu_seqlens.long()
        if cu[0].item() != 0 or cu[-1].item() != T or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {cu.tolist()[:8]}...")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              rewards: torch.Tensor, cu_seqlens: torch.Tensor, group_size: int, *, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, kl: str = "k3", agg: str = "token-mean",
              adv_norm: str = "std", token_adv: torch.Tensor | None = None,
              is_weights: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
              impl: str = "auto") -> tuple[torch.Tensor, dict]:
    """GRPO clipped-surrogate loss (+ beta KL) over flat response tokens; see the module docstring for the math.

    logprobs, old_logprobs, ref_logprobs (or None when beta = 0), token_adv (optional, fp32, no grad): (T,) fp32,
    bf16 or fp16; rewards: (B,) fp32; cu_seqlens: (B+1,) int32/int64 from 0 to T (repeated entries = empty
    responses); B = prompts x group_size with a prompt's responses adjacent. is_weights (optional, (T,) fp32, no
    grad): per-token factor on the clipped surrogate (not on the KL term), e.g. tis_weights(old, rollout, cap).
    advantages (optional, (B,) fp32, no grad): A_i taken as given (rewards and adv_norm then do not enter A).
    Returns (loss 0-d fp32 with grad to logprobs only, {name: detached 0-d fp32} for STAT_NAMES).
    """
    _check_inputs(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, beta, kl, agg, adv_norm,
                  token_adv, is_weights, advantages)
    if resolve_impl(impl, logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens) == "torch":
        return grpo_loss_torch(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size,
                               eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl, agg=agg, adv_norm=adv_norm,
                               token_adv=token_adv, is_weights=is_weights, advantages=advantages)
    if logprobs.shape[0] >= 2**31:
        raise ValueError(f"logprobs has {logprobs.shape[0]} tokens; the Triton path indexes with int32")
    contig = lambda x: x.detach().contiguous() if x is not None else None
    write_grad = torch.is_grad_enabled() and logprobs.requires_grad
    loss, _dlp, stats = _grpo_loss_op(logprobs.contiguous(), contig(old_logprobs), contig(ref_logprobs),
                                      contig(rewards), contig(cu_seqlens), contig(token_adv), group_size,
                                      float(eps_low), float(eps_high), float(beta), kl, agg, adv_norm, write_grad,
                                      contig(is_weights), contig(advantages))
    stats = stats.detach()
    return loss, {name: stats[k] for k, name in enumerate(STAT_NAMES)}


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights min(exp(old - rollout), cap) per response token, detached fp32.

    old_logprobs: the trainer's old-policy log-probs; rollout_logprobs: the engine's sampling log-probs (same (T,)
    order and temperature). TRL's token_truncate (clip_min None) and verl's token TIS; verl also clamps the log-ratio
    to [-20, 20] first, which changes only weights below exp(-20) = 2e-9 (TRL does not clamp; exp overflow gives
    inf, which the cap turns into cap). cap > 0."""
    if not cap > 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    if old_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} and rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} must have the same shape")
    return torch.exp(old_logprobs.detach().float() - rollout_logprobs.detach().float()).clamp(max=cap)
