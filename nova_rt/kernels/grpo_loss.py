"""Fused GRPO policy loss over flat response tokens: advantages, ratio, clipped surrogate, KL, aggregation and
d logprobs in one pass over the log-probs, deterministic (fixed-order reduce, no atomics), no (T,) index tensor.

    A_i  = (R_i - mean_g R) / (std_g R + 1e-4)   (adv_norm="none": R_i - mean_g R; or given);   a_t = A_i + tadv_t
    r_t  = exp(clamp(lp_t - old_t, -20, 20)),    pg_t = -min(r_t a_t, clip(r_t, 1 - eps_low, 1 + eps_high) a_t)
    loss = sum_t w_t (c_t pg_t + beta kl_t)      kl_t: k1 | k2 | k3;  c_t: is_weights (rollout correction), constant
    w_t  = 1 / T | 1 / (n_nonempty L_i) | 1 / (B max_i L_i)   (token-mean | seq-mean-token-mean | ...-sum-norm)
pg_t above is mode="ppo_clip"; cispo, sapo and gspo_token replace it in the same kernel (LOSS_MODE), gspo and gmpo
run in PyTorch: grpo_loss_torch.py has the table, docs/algorithms.md the papers and the peers' conventions.

Triton: an advantage kernel (one program), a loss kernel per block of tokens (each finds its response by binary
search over cu_seqlens and writes d logprobs in the same pass), a reduce kernel; backward scales the saved d logprobs.
Clamps, equal rewards, IS weights, stats, traffic: docs/kernels.md#grpo_loss; the oracle: reference.py.
Legend: T response tokens (flat), B responses, G group size (adjacent responses), P token blocks (partials).
"""

import torch
import triton
import triton.language as tl

from nova_rt.kernels import grpo_loss_torch as _torch_path
from nova_rt.kernels import resolve_impl
from nova_rt.kernels.grpo_loss_torch import (
    SEQUENCE_MODES,
    STAT_NAMES,
    check_inputs,
    correction_weights,
    grpo_loss_torch,
    seq_mean_log_ratio,
)

__all__ = ["STAT_NAMES", "correction_weights", "grpo_loss", "grpo_loss_fwd", "grpo_loss_torch"]
# The constexpr tables (names -> kernel codes), shared with the torch path and nova_rt/kernels/aot.py.
_KL_MODES, _AGG_MODES, _LOSS_MODES = _torch_path.KL_MODES, _torch_path.AGG_MODES, _torch_path.LOSS_MODES
_ADV_NORMS = _torch_path.ADV_NORMS


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
def _surrogate(lp, x, a, eps_low, eps_high, tau_pos, tau_neg, LOSS_MODE: tl.constexpr):
    """Per-token policy term of the mode (grpo_loss_torch's table), d term / d lp, clipped flag and ratio; x is the
    log-ratio (gspo_token: the response's mean). Clamped log-ratios (|x| > 20) get no gradient, except in cispo,
    whose ratio is a constant factor."""
    ratio = tl.exp(tl.minimum(tl.maximum(x, -20.0), 20.0))
    outside = (x < -20.0) | (x > 20.0)
    if LOSS_MODE == 1:  # cispo: -sg[clip(r)] a lp
        kept = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        loss = -kept * a * lp
        dloss = -kept * a
        clipped = kept != ratio
    elif LOSS_MODE == 2:  # sapo: -a (4 / tau) sigmoid(tau (r - 1)); d/d lp = -4 a g (1 - g) r
        tau = tl.where(a > 0, tau_pos, tau_neg)
        gate = 1.0 / (1.0 + tl.exp(tau * (1.0 - ratio)))
        neg_a4 = -4.0 * a * gate
        loss = neg_a4 / tau
        dloss = tl.where(outside, 0.0, neg_a4 * (1.0 - gate) * ratio)
        clipped = ratio != ratio  # no hard clip: all False
    else:  # ppo_clip, gspo_token: d(-a r)/d lp = -a r = pg1 unless the clipped term is the max
        pg1 = -a * ratio
        pg2 = -a * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        clipped = pg2 > pg1
        loss = tl.maximum(pg1, pg2)
        dloss = tl.where(clipped | outside, 0.0, pg1)
    return loss, dloss, clipped, ratio


@triton.jit
def _grpo_loss_fwd_kernel(LP_T, OLD_T, REF_T, TADV_T, ISW_T, SEQ_B, CU, ADV_B, W_B, DLP_T, PART_4P,
                          T, B, P, n_search, eps_low, eps_high, beta, tau_pos, tau_neg,
                          HAS_REF: tl.constexpr, HAS_TADV: tl.constexpr, HAS_ISW: tl.constexpr, KL: tl.constexpr,
                          LOSS_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    m = t < T
    full = pid * BLOCK_T + BLOCK_T <= T
    # Streaming loads first, so they are in flight during the cu_seqlens search. Full blocks load unmasked: a
    # `t < T` mask with T % 16 != 0 would stop 16-B vector loads.
    if full:
        lp = tl.load(LP_T + t).to(tl.float32)
        old = tl.load(OLD_T + t).to(tl.float32) if LOSS_MODE != 3 else lp
        ref = tl.load(REF_T + t).to(tl.float32) if HAS_REF else lp
        tadv = tl.load(TADV_T + t).to(tl.float32) if HAS_TADV else tl.zeros_like(lp)
        isw = tl.load(ISW_T + t).to(tl.float32) if HAS_ISW else tl.zeros_like(lp) + 1.0
    else:
        lp = tl.load(LP_T + t, mask=m, other=0.0).to(tl.float32)
        old = tl.load(OLD_T + t, mask=m, other=0.0).to(tl.float32) if LOSS_MODE != 3 else lp
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
    if LOSS_MODE == 3:  # gspo_token: the response's mean log-ratio, computed by the launcher
        x = tl.load(SEQ_B + seq, mask=m, other=0.0)
    else:
        x = lp - old
    term, dterm, clipped, ratio = _surrogate(lp, x, a, eps_low, eps_high, tau_pos, tau_neg, LOSS_MODE)
    # The IS weight (rollout correction) scales the policy term (not the KL below) and has no gradient.
    loss = isw * term
    dloss = isw * dterm
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
                  advantages_B: torch.Tensor | None = None, mode: str = "ppo_clip",
                  sapo_tau: tuple[float, float] = (1.0, 1.05)):
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
        # gspo_token's per-response mean log-ratio (float64 prefix sums in torch); unused by the other modes.
        seq_B = seq_mean_log_ratio(logprobs_T, old_logprobs_T, cu_seqlens).float() if mode == "gspo_token" \
            else adv_B
        _grpo_loss_fwd_kernel[(n_blocks,)](
            logprobs_T, old_logprobs_T, ref_logprobs_T if has_ref else logprobs_T,
            token_adv_T if has_tadv else logprobs_T, is_weights_T if has_isw else logprobs_T, seq_B, cu_seqlens,
            adv_B, w_B, dlp_T if write_grad else logprobs_T, part_4P, T, B, n_blocks, (B - 1).bit_length(),
            eps_low, eps_high, beta, float(sapo_tau[0]), float(sapo_tau[1]), HAS_REF=has_ref, HAS_TADV=has_tadv,
            HAS_ISW=has_isw, KL=_KL_MODES[kl], LOSS_MODE=_LOSS_MODES[mode], WRITE_GRAD=write_grad,
            BLOCK_T=block_t, num_warps=_FWD_WARPS)
    _grpo_reduce_kernel[(1,)](part_4P, loss, stats, n_blocks, inv_tokens, BLOCK_P=block_p)
    return loss, dlp_T, stats


# ----------------------------------------------------------------------------------------------- binding
@torch.library.custom_op("nova_rt::grpo_loss", mutates_args=())
def _grpo_loss_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                  rewards: torch.Tensor, cu_seqlens: torch.Tensor, token_adv: torch.Tensor | None, group_size: int,
                  eps_low: float, eps_high: float, beta: float, kl: str, agg: str, adv_norm: str,
                  write_grad: bool, is_weights: torch.Tensor | None,
                  advantages: torch.Tensor | None = None, mode: str = "ppo_clip", tau_pos: float = 1.0,
                  tau_neg: float = 1.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return grpo_loss_fwd(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, token_adv, group_size,
                         eps_low, eps_high, beta, kl, agg, adv_norm, write_grad, is_weights_T=is_weights,
                         advantages_B=advantages, mode=mode, sapo_tau=(tau_pos, tau_neg))


@_grpo_loss_op.register_fake
def _(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, token_adv, group_size, eps_low, eps_high, beta,
      kl, agg, adv_norm, write_grad, is_weights, advantages=None, mode="ppo_clip", tau_pos=1.0, tau_neg=1.05):
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
    return (dlp_T * grad_loss,) + (None,) * 18


_grpo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public op
def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              rewards: torch.Tensor, cu_seqlens: torch.Tensor, group_size: int, *, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, kl: str = "k3", agg: str = "token-mean",
              adv_norm: str = "std", token_adv: torch.Tensor | None = None,
              is_weights: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
              mode: str = "ppo_clip", sapo_tau: tuple[float, float] = (1.0, 1.05),
              impl: str = "auto") -> tuple[torch.Tensor, dict]:
    """GRPO policy loss (+ beta KL) over flat response tokens; see the module docstring for the math.

    logprobs, old_logprobs, ref_logprobs (or None when beta = 0), token_adv (optional, fp32, no grad): (T,) fp32,
    bf16 or fp16; rewards: (B,) fp32; cu_seqlens: (B+1,) int32/int64 from 0 to T (repeated entries = empty
    responses); B = prompts x group_size with a prompt's responses adjacent. is_weights (optional, (T,) fp32, no
    grad): per-token factor on the clipped surrogate (not on the KL term), e.g. correction_weights(...)[0].
    advantages (optional, (B,) fp32, no grad): A_i taken as given (rewards and adv_norm then do not enter A).
    mode: the policy term (grpo_loss_torch's table; gspo and gmpo always take the torch path); sapo_tau: SAPO's
    (tau_pos, tau_neg). Returns (loss 0-d fp32 with grad to logprobs only, {name: detached 0-d fp32} for STAT_NAMES).
    """
    check_inputs(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size, beta, kl, agg, adv_norm,
                 token_adv, is_weights, advantages, mode, sapo_tau)
    impl = resolve_impl(impl, logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens)
    if impl == "torch" or mode in SEQUENCE_MODES:
        return grpo_loss_torch(logprobs, old_logprobs, ref_logprobs, rewards, cu_seqlens, group_size,
                               eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl, agg=agg, adv_norm=adv_norm,
                               token_adv=token_adv, is_weights=is_weights, advantages=advantages, mode=mode,
                               sapo_tau=sapo_tau)
    if logprobs.shape[0] >= 2**31:
        raise ValueError(f"logprobs has {logprobs.shape[0]} tokens; the Triton path indexes with int32")
    contig = lambda x: x.detach().contiguous() if x is not None else None
    write_grad = torch.is_grad_enabled() and logprobs.requires_grad
    loss, _dlp, stats = _grpo_loss_op(logprobs.contiguous(), contig(old_logprobs), contig(ref_logprobs),
                                      contig(rewards), contig(cu_seqlens), contig(token_adv), group_size,
                                      float(eps_low), float(eps_high), float(beta), kl, agg, adv_norm, write_grad,
                                      contig(is_weights), contig(advantages), mode, float(sapo_tau[0]),
                                      float(sapo_tau[1]))
    stats = stats.detach()
    return loss, {name: stats[k] for k, name in enumerate(STAT_NAMES)}
