"""float64 oracles of the kernel ops, written from the definitions (loops over documents, responses, tokens),
for the tests: each op's output and gradients are compared with these (flash-attention's rule, |out - oracle| <=
2 |eager - oracle| + floor). They materialise what the kernels avoid ((T, V) logits, T x T scores) and are slow:
tests and small shapes only.

    fused_linear_logprobs_ref   nova_rt.kernels.fused_linear_logprobs (also the naive eager baseline in any dtype)
    packed_attention_ref        nova_rt.kernels.packed_attention (forward and the three gradients)
    grpo_loss_ref               nova_rt.kernels.grpo_loss, with grpo_advantages_ref and kl_estimator_ref
    correction_weights_ref      nova_rt.kernels.grpo_loss.correction_weights (rollout correction)

Legend: T tokens, D model dim, V vocab, K top-k ids per token, N query heads, K kv heads (attention), H head dim,
B responses, G group size.
"""

from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------------------------- fused_linear_logprobs
def fused_linear_logprobs_ref(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, tau: float,
                              ids_TK: torch.Tensor | None, dtype: torch.dtype = torch.float64) -> dict:
    """fused_linear_logprobs from materialised (T, V) logits: {"logprobs", "entropy", "topk_logprobs" (with ids)}.

    Softmax math in `dtype`: float64 (on float64 inputs) is the oracle; the input dtype gives naive eager (the logits
    in the input dtype, softmax in fp32). Differentiable: autograd gives the oracle's gradients."""
    z_TV = (h_TD @ w_VD.T).to(torch.float64 if dtype == torch.float64 else torch.float32) / tau
    lp_TV = torch.log_softmax(z_TV, dim=1)
    valid = labels_T != -100
    out = {"logprobs": torch.where(valid, lp_TV.gather(1, labels_T.clamp_min(0)[:, None])[:, 0], 0.0),
           "entropy": -(lp_TV.exp() * lp_TV).sum(1)}
    if ids_TK is not None:
        out["topk_logprobs"] = lp_TV.gather(1, ids_TK)
    return out


# ----------------------------------------------------------------------------------------------- packed_attention
def packed_attention_ref(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, lengths: list[int],
                         g_TNH: torch.Tensor, causal: bool, scale: float):
    """(out, dq, dk, dv) in float64 for upstream grad g_TNH: per document and query head, scores -> mask -> softmax
    -> matmul; grads by autograd per document."""
    q, k, v, g = (x.detach().double() for x in (q_TNH, k_TKH, v_TKH, g_TNH))
    N, K = q.shape[1], k.shape[1]
    head_map = [n // (N // K) for n in range(N)]  # query head n reads kv head n // G
    out, dq, dk, dv = (torch.zeros_like(x) for x in (q, q, k, v))
    a = 0
    for L in lengths:
        if L == 0:
            continue
        qs, ks, vs = (x[a : a + L].clone().requires_grad_() for x in (q, k, v))
        rows = []
        for n in range(N):
            s = (qs[:, n] @ ks[:, head_map[n]].T) * scale
            if causal:
                s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
            rows.append(torch.softmax(s, dim=-1) @ vs[:, head_map[n]])
        o = torch.stack(rows, dim=1)
        grads = torch.autograd.grad(o, (qs, ks, vs), g[a : a + L])
        out[a : a + L] = o.detach()
        for acc, gr in zip((dq, dk, dv), grads):
            acc[a : a + L] = gr
        a += L
    return out, dq, dk, dv


# ----------------------------------------------------------------------------------------------- grpo_loss
def kl_estimator_ref(lp: torch.Tensor, ref: torch.Tensor, kl: str) -> torch.Tensor:
    """Per-token k1 / k2 / k3 (k3: d = ref - lp clamped to [-20, 20], the estimate capped at 10), as grpo_loss."""
    if kl == "k1":
        return lp - ref
    if kl == "k2":
        return 0.5 * (lp - ref) ** 2
    d = torch.clamp(ref - lp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, max=10.0)


def grpo_advantages_ref(rewards: list[float], G: int, adv_norm: str) -> list[float]:
    """Group advantages, one Python float per response: r - mean(group), divided by (std + 1e-4) (Bessel) for "std";
    0 for a group of one or of equal rewards."""
    adv = []
    for g in range(len(rewards) // G):
        grp = rewards[g * G:(g + 1) * G]
        mean = sum(grp) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (G - 1)) if G > 1 else 0.0
        for r in grp:
            if G == 1 or max(grp) == min(grp):
                adv.append(0.0)
            else:
                adv.append((r - mean) / (std + 1e-4) if adv_norm == "std" else r - mean)
    return adv


def policy_term_ref(mode: str, lp: torch.Tensor, old: torch.Tensor, a: torch.Tensor, eps_low: float, eps_high: float,
                    sapo_tau: tuple[float, float]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One response's policy term per token (gmpo: the response's term on each token), written from the papers in
    ratio space; returns (term (L,), clipped token count, the ratio the stats report per token)."""
    r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    if mode in ("ppo_clip", "gspo", "gspo_token"):
        log_s = (lp - old).sum() / len(lp)  # s_i = (pi(y_i) / pi_old(y_i)) ^ (1 / |y_i|)
        if mode == "gspo":
            r = torch.exp(torch.clamp(log_s, -20.0, 20.0)).expand(len(lp))
        elif mode == "gspo_token":  # s_i,t = sg[s_i] pi_t / sg[pi_t] (clamped: no gradient)
            r = torch.exp(torch.clamp(log_s.detach() + lp - lp.detach(), -20.0, 20.0))
        unclipped, clipped = r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a
        return -torch.minimum(unclipped, clipped), int((clipped < unclipped).sum()), r
    if mode == "cispo":
        kept = torch.clamp(r, 1 - eps_low, 1 + eps_high).detach()
        return -kept * a * lp, int((kept != r).sum()), r
    if mode == "sapo":
        tau = torch.where(a > 0, sapo_tau[0], sapo_tau[1])
        return -a * torch.sigmoid(tau * (r - 1)) * 4 / tau, 0, r
    assert mode == "gmpo", mode
    # per token: min(r A, clip(r, e^-eps_low, e^eps_high) A) / A, i.e. clipped on the side that A's sign selects
    bounded = torch.clamp(r, math.exp(-eps_low), math.exp(eps_high))
    kept = torch.where(a > 0, torch.minimum(r, bounded), torch.where(a < 0, torch.maximum(r, bounded), 1.0))
    n_clip = int(((a != 0) & (kept != r)).sum())
    geo = torch.exp(torch.log(kept).mean())  # prod_t kept_t ^ (1 / |y_i|)
    a_mean = a.mean() if a.dim() else a
    return (-a_mean * geo).expand(len(lp)), n_clip, torch.exp(torch.log(r).mean()).expand(len(lp))


def grpo_loss_ref(lp_T: torch.Tensor, old_T: torch.Tensor, ref_T: torch.Tensor | None, rewards_B: torch.Tensor,
                  cu: torch.Tensor, G: int, tadv_T: torch.Tensor | None = None, *, eps_low: float, eps_high: float,
                  beta: float, kl: str, agg: str, adv_norm: str, is_T: torch.Tensor | None = None,
                  advantages_B: torch.Tensor | None = None, mode: str = "ppo_clip",
                  sapo_tau: tuple[float, float] = (1.0, 1.05)) -> dict:
    """grpo_loss in float64, one response at a time (a Python loop over responses; autograd for the gradient).

    is_T: per-token importance weights (rollout correction) on the clipped surrogate only (not the KL), constants.
    advantages_B: given per-response advantages, used as A_i instead of the group advantages of rewards_B.
    mode, sapo_tau: the policy term (policy_term_ref); gmpo's IS factor: the weights' geometric mean per response.

    Returns loss, grad (T,) w.r.t. lp_T, the loss scale sum_t w_t |l_t| (for a tolerance), stats, clip count, T."""
    lp = lp_T.detach().double().requires_grad_()
    old = old_T.double()
    ref = ref_T.double() if ref_T is not None else None
    tadv = tadv_T.double() if tadv_T is not None else None
    isw = is_T.detach().double() if is_T is not None else None
    cu = cu.tolist()
    B, T = len(cu) - 1, cu[-1]
    adv = advantages_B.double().tolist() if advantages_B is not None else \
        grpo_advantages_ref(rewards_B.double().tolist(), G, adv_norm)
    lens = [cu[i + 1] - cu[i] for i in range(B)]
    n_nonempty, longest = sum(n > 0 for n in lens), max(lens)
    loss, scale, n_clip, kl_sum, ratio_sum = lp.sum() * 0.0, 0.0, 0, 0.0, 0.0
    for i in range(B):
        s, e = cu[i], cu[i + 1]
        if e == s:
            continue
        a = adv[i] + (tadv[s:e] if tadv is not None else torch.zeros(e - s, dtype=torch.float64))
        tok, n, ratio = policy_term_ref(mode, lp[s:e], old[s:e], a, eps_low, eps_high, sapo_tau)
        if isw is not None:
            tok = tok * (torch.exp(torch.log(isw[s:e] + 1e-10).mean()) if mode == "gmpo" else isw[s:e])
        n_clip += n
        ratio_sum += ratio.sum().item()
        if ref is not None:
            k = kl_estimator_ref(lp[s:e], ref[s:e], kl)
            kl_sum += k.sum().item()
            tok = tok + beta * k
        if agg == "token-mean":
            w = 1.0 / T
        elif agg == "seq-mean-token-mean":
            w = 1.0 / (n_nonempty * (e - s))
        else:
            w = 1.0 / (B * longest)
        loss = loss + w * tok.sum()
        scale += w * tok.abs().sum().item()
    loss.backward()
    adv_mean = sum(adv) / B
    stats = {"clip_frac": n_clip / max(T, 1), "kl_mean": kl_sum / max(T, 1), "adv_mean": adv_mean,
             "adv_std": math.sqrt(sum((x - adv_mean) ** 2 for x in adv) / B), "ratio_mean": ratio_sum / max(T, 1)}
    return {"loss": loss.item(), "grad": lp.grad, "scale": scale, "stats": stats, "n_clip": n_clip, "T": T}


def correction_weights_ref(old_T: torch.Tensor, rollout_T: torch.Tensor, lengths: list[int], mode: str, *,
                           cap: float = 3.0, low: float = 0.5, high: float = 5.0) -> tuple[list[float], list[bool]]:
    """Rollout-correction weights in float64, one response at a time: (weight, dropped) per token. The ratio is
    pi_old / pi_rollout of the token (token_*, icepop) or the product over its response (sequence_*); truncate caps
    it at cap, mask zeroes it above cap, icepop zeroes it outside [low, high]; a NaN log-ratio counts as 0."""
    weights, dropped, start = [], [], 0
    for n in lengths:
        diffs = [0.0 if math.isnan(d) else d for d in (old_T[start:start + n].double() -
                                                     rollout_T[start:start + n].double()).tolist()]
        start += n
        seq_ratio = math.exp(min(sum(diffs), 700.0))
        for d in diffs:
            ratio = seq_ratio if mode.startswith("sequence") else math.exp(min(d, 700.0))
            if mode.endswith("truncate"):
                weights.append(min(ratio, cap))
                dropped.append(False)
                continue
            drop = ratio > cap if mode != "icepop" else not low <= ratio <= high
            weights.append(0.0 if drop else ratio)
            dropped.append(drop)
    return weights, dropped
