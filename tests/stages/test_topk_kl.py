"""The report's exact truncated KL (nova_rt.losses.kl) against float64 oracles written from the definition.

Oracles: a plain Python loop over tokens and ids (renormalise over the reference's top-k ids, sum p log p/q), and the
full-vocabulary KL from log_softmax of float64 logits. Inputs are drawn afresh each run; the seed is in every message.

Legend: T tokens, V vocab, K top-k ids, D model dim.
"""

import math
import os

import pytest
import torch

from nova_rt.kernels.fused_linear_logprobs import fused_linear_logprobs
from nova_rt.kernels.topk_select import reference_topk
from nova_rt.losses.kl import kl_penalty_token_adv, reverse_cumsum_segments, sampled_kl, topk_kl
from tests.helpers import assert_close_verbose


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _loop_topk_kl(pol_logits_TV, ref_logits_TV, k):
    """Per token: the reference's k largest ids, both distributions renormalised over them, exact KL (python loop)."""
    out = []
    for t in range(pol_logits_TV.shape[0]):
        ids = sorted(range(ref_logits_TV.shape[1]), key=lambda v: -ref_logits_TV[t, v].item())[:k]
        zp = [pol_logits_TV[t, v].item() for v in ids]
        zr = [ref_logits_TV[t, v].item() for v in ids]
        mp, mr = max(zp), max(zr)
        sp, sr = sum(math.exp(z - mp) for z in zp), sum(math.exp(z - mr) for z in zr)
        kl = 0.0
        for a, b in zip(zp, zr):
            p = math.exp(a - mp) / sp
            q = math.exp(b - mr) / sr
            kl += p * (math.log(p) - math.log(q)) if p > 0 else 0.0
        out.append(kl)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("T, V", [(1, 2), (7, 33), (13, 100), (5, 257)])
def test_topk_kl_matches_loop_oracle_and_is_nonnegative(T, V):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for scale, k in [(0.1, 1), (1.0, max(1, V // 3)), (4.0, V - 1 if V > 1 else 1), (8.0, V)]:
        ref = torch.randn(T, V, generator=gen, dtype=torch.float64) * scale
        pol = ref + torch.randn(T, V, generator=gen, dtype=torch.float64) * scale * torch.rand(1, generator=gen).item()
        ids = torch.topk(ref, k, dim=1).indices
        lp_pol, lp_ref = torch.log_softmax(pol, 1), torch.log_softmax(ref, 1)
        kl = topk_kl(lp_pol.gather(1, ids), lp_ref.gather(1, ids))
        assert (kl >= 0).all(), f"seed {seed}: negative KL {kl.min().item()} (k={k}, scale={scale})"
        assert_close_verbose(kl, _loop_topk_kl(pol, ref, k), rtol=1e-9, atol=1e-12,
                             name=f"topk KL seed {seed} k={k} scale={scale}")
        if k == 1:
            assert torch.equal(kl, torch.zeros_like(kl)), f"seed {seed}: one id gives KL exactly 0"


@pytest.mark.parametrize("V", [2, 31, 128])
def test_topk_kl_with_k_equal_vocab_is_the_exact_kl(V):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    T = 9
    pol = torch.randn(T, V, generator=gen, dtype=torch.float64) * 3
    ref = torch.randn(T, V, generator=gen, dtype=torch.float64) * 3
    exact = (torch.softmax(pol, 1) * (torch.log_softmax(pol, 1) - torch.log_softmax(ref, 1))).sum(1)
    perm = torch.stack([torch.randperm(V, generator=gen) for _ in range(T)])  # any order of all V ids
    # un-normalised inputs (shifted per row) must give the same result: only differences within a row matter
    kl = topk_kl(pol.gather(1, perm) + 5.0, torch.log_softmax(ref, 1).gather(1, perm))
    assert_close_verbose(kl, exact, rtol=1e-10, atol=1e-13, name=f"k=V KL seed {seed}")
    # the same with the fp32 inputs the stage uses
    kl32 = topk_kl(torch.log_softmax(pol, 1).float().gather(1, perm), torch.log_softmax(ref, 1).float().gather(1, perm))
    assert_close_verbose(kl32, exact, rtol=1e-4, atol=1e-5, name=f"k=V KL fp32 seed {seed}")


def test_topk_kl_through_the_fused_op_and_its_gradient():
    """Policy top-k log-probs from fused_linear_logprobs at reference_topk's ids: value and d/d hidden vs float64."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    T, D, V, K = 11, 16, 97, 20
    h_pol = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w_pol = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.5
    h_ref = h_pol + 0.3 * torch.randn(T, D, generator=gen, dtype=torch.float64)
    w_ref = w_pol + 0.3 * torch.randn(V, D, generator=gen, dtype=torch.float64)
    ids, ref_lp = reference_topk(h_ref.float(), w_ref.float(), K)
    assert torch.equal(ids.sort(1).values, torch.topk(h_ref @ w_ref.T, K, 1).indices.sort(1).values), f"seed {seed}"
    h = h_pol.float().requires_grad_(True)
    out = fused_linear_logprobs(h, w_pol.float(), torch.full((T,), -100, dtype=torch.int64), topk_ids=ids)
    kl = topk_kl(out["topk_logprobs"], ref_lp)
    g_T = torch.rand(T, generator=gen, dtype=torch.float64)
    (kl * g_T.float()).sum().backward()
    h64 = h_pol.clone().requires_grad_(True)
    oracle = _torch_topk_kl(h64 @ w_pol.T, h_ref @ w_ref.T, ids)
    (oracle * g_T).sum().backward()
    assert_close_verbose(kl, oracle.detach(), rtol=1e-4, atol=1e-5, name=f"fused topk KL seed {seed}")
    assert_close_verbose(h.grad, h64.grad, rtol=1e-3, atol=1e-5, name=f"d hidden seed {seed}")


def _torch_topk_kl(pol_logits, ref_logits, ids):
    p = torch.log_softmax(pol_logits.gather(1, ids), 1)
    q = torch.log_softmax(ref_logits.gather(1, ids), 1)
    return (p.exp() * (p - q)).sum(1)


def test_reverse_cumsum_segments_and_token_adv():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lens = [0, 1, 5, 0, 3, 1, 8]
    x = torch.rand(sum(lens), generator=gen, dtype=torch.float64) + 0.1
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    expect, off = [], 0
    for n in lens:
        for t in range(n):
            expect.append(sum(x[off + s].item() for s in range(t, n)))
        off += n
    got = reverse_cumsum_segments(x, cu)
    assert_close_verbose(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12,
                         name=f"return-to-go seed {seed}")
    beta = 0.37
    adv = kl_penalty_token_adv(x.float(), cu, beta)
    assert_close_verbose(adv, -beta * torch.tensor(expect), rtol=1e-5, atol=1e-6, name=f"token_adv seed {seed}")
    with pytest.raises(ValueError, match="cu_seqlens"):
        reverse_cumsum_segments(x, torch.tensor([0, 3], dtype=torch.int32))


def test_sampled_estimators():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lp, ref = -3 * torch.rand(50, generator=gen), -3 * torch.rand(50, generator=gen)
    d = (ref - lp).double()
    assert_close_verbose(sampled_kl(lp, ref, "k1"), -d, rtol=1e-6, atol=1e-6, name=f"k1 seed {seed}")
    assert_close_verbose(sampled_kl(lp, ref, "k2"), d * d / 2, rtol=1e-5, atol=1e-6, name=f"k2 seed {seed}")
    assert_close_verbose(sampled_kl(lp, ref, "k3"), (d.exp() - d - 1).clamp(max=10), rtol=1e-5, atol=1e-6,
                         name=f"k3 seed {seed}")
    assert (sampled_kl(lp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        sampled_kl(lp, ref, "k4")
    with pytest.raises(ValueError, match=r"\(T, K\)"):
        topk_kl(lp[:, None], ref[:10, None])
