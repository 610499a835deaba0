"""grpo_loss's optional inputs beyond the GRPO defaults, against the float64 oracle of nova_rt.kernels.reference:
precomputed per-response advantages (`advantages=`). Both the torch path and the Triton path (TRITON_INTERPRET=1 on
CPU); inputs are drawn afresh each run (the seed is in every failure message).

Legend: T response tokens (flat), B responses, G group size.
"""

import math

import pytest
import torch

from nova_rt.kernels.grpo_loss import STAT_NAMES, grpo_loss, grpo_loss_fwd
from nova_rt.kernels.reference import grpo_loss_ref
from tests.helpers import assert_close_verbose
from tests.kernels.test_grpo_loss import AGGS, IMPLS, Case, _make_case, _random_is_weights, _seed


def _given_advantages(gen, B: int) -> torch.Tensor:
    """Random per-response advantages with some exact zeros (as a filtered or all-equal group would give)."""
    adv = 1.5 * torch.randn(B, generator=gen)
    adv[torch.rand(B, generator=gen) < 0.2] = 0.0
    return adv


def _check_given(case: Case, adv_B: torch.Tensor, impl: str, ctx: str, isw_T=None, **kw) -> None:
    want = grpo_loss_ref(case.lp_T, case.old_T, case.ref_T, case.rewards_B, case.cu, case.G, case.tadv_T,
                         is_T=isw_T, advantages_B=adv_B, **kw)
    lp = case.lp_T.clone().requires_grad_()
    loss, stats = grpo_loss(lp, case.old_T, case.ref_T, case.rewards_B, case.cu, case.G, token_adv=case.tadv_T,
                            is_weights=isw_T, advantages=adv_B, impl=impl, **kw)
    loss.backward()
    assert abs(loss.item() - want["loss"]) <= 1e-5 * want["scale"] + 1e-7, f"loss {loss.item()} vs {want['loss']} {ctx}"
    assert round(stats["clip_frac"].item() * want["T"]) == want["n_clip"], ctx
    for name in STAT_NAMES[1:]:
        got, ref = stats[name].item(), want["stats"][name]
        assert abs(got - ref) <= 1e-5 * (abs(ref) + 1.0), f"{name} {got} vs {ref} {ctx}"
    if want["T"]:
        assert_close_verbose(lp.grad, want["grad"], rtol=1e-4, atol=1e-5 * want["grad"].abs().max().item(),
                             name=f"d logprobs {ctx}")


@pytest.mark.parametrize("impl", IMPLS)
def test_given_advantages_match_oracle(impl):
    """A_i = advantages[i] exactly (no group centring or scaling), token_adv still added, TIS and KL unchanged;
    ragged responses with length-0 and length-1 ones, leading and trailing empty responses."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    configs = [("token-mean", "k3", "std", 0.0, False, False, 3), ("seq-mean-token-mean", "k1", "none", 0.2, True,
                                                                   True, 4),
               ("seq-mean-token-sum-norm", "k2", "std", 0.1, True, False, 5), ("seq-mean-token-mean", "k3", "std",
                                                                              0.0, False, True, 1)]
    for agg, kl, norm, beta, has_tadv, tis, G in configs:
        case = _make_case(gen, n_prompts=int(torch.randint(2, 6, (1,), generator=gen)), G=G, has_tadv=has_tadv,
                          eps=(0.2, 0.28))
        if G == 5:  # empty first and last responses: one extra group of G at each end
            pad = case.cu.new_zeros(G)
            case.cu = torch.cat([pad, case.cu, pad + case.cu[-1]])
            case.rewards_B = torch.cat([torch.randn(G, generator=gen), case.rewards_B, torch.randn(G, generator=gen)])
        adv_B = _given_advantages(gen, case.rewards_B.numel())
        isw = _random_is_weights(gen, case) if tis else None
        kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, kl=kl, agg=agg, adv_norm=norm)
        _check_given(case, adv_B, impl, f"[seed {seed} {impl} G={G} T={case.lp_T.numel()} {kw}]", isw_T=isw, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_given_advantages_ignore_rewards(impl):
    """Other rewards, same advantages: bit-identical loss, gradient and stats; the stats describe the given A."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    case = _make_case(gen, n_prompts=4, G=3, has_tadv=True)
    adv_B = _given_advantages(gen, 12)
    out = []
    for rewards in (case.rewards_B, torch.randn(12, generator=gen)):
        lp = case.lp_T.clone().requires_grad_()
        loss, stats = grpo_loss(lp, case.old_T, case.ref_T, rewards, case.cu, 3, beta=0.1, token_adv=case.tadv_T,
                                advantages=adv_B, impl=impl)
        loss.backward()
        out.append((loss, lp.grad, stats))
    (loss0, grad0, stats0), (loss1, grad1, stats1) = out
    msg = f"seed {seed} {impl}"
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1), msg
    assert all(torch.equal(stats0[k], stats1[k]) for k in STAT_NAMES), msg
    assert math.isclose(stats0["adv_mean"].item(), adv_B.double().mean().item(), rel_tol=1e-5, abs_tol=1e-6), msg
    assert math.isclose(stats0["adv_std"].item(), adv_B.double().std(correction=0).item(), rel_tol=1e-5), msg


def test_given_advantages_multi_block_launcher():
    """The Triton launcher with small blocks (several advantage tiles and token blocks) against the oracle."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    case = _make_case(gen, n_prompts=8, G=3, max_len=80, has_tadv=True)
    adv_B = _given_advantages(gen, 24)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, kl="k3", agg="seq-mean-token-mean", adv_norm="std")
    want = grpo_loss_ref(case.lp_T, case.old_T, case.ref_T, case.rewards_B, case.cu, 3, case.tadv_T,
                         advantages_B=adv_B, **kw)
    loss, dlp, stats = grpo_loss_fwd(case.lp_T, case.old_T, case.ref_T, case.rewards_B, case.cu, case.tadv_T, 3,
                                     kw["eps_low"], kw["eps_high"], kw["beta"], kw["kl"], kw["agg"], kw["adv_norm"],
                                     block_t=16, block_b=16, block_p=16, advantages_B=adv_B)
    assert abs(loss.item() - want["loss"]) <= 1e-5 * want["scale"], f"seed {seed}"
    assert_close_verbose(stats[2:4], torch.tensor([want["stats"]["adv_mean"], want["stats"]["adv_std"]]),
                         rtol=1e-5, atol=1e-6, name=f"adv stats seed {seed}")
    assert_close_verbose(dlp, want["grad"], rtol=1e-4, atol=1e-5 * want["grad"].abs().max().item(),
                         name=f"dlp seed {seed}")


def test_given_advantages_custom_op_and_bad_shape():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    case = _make_case(gen, n_prompts=2, G=3, has_tadv=True)
    args = (case.lp_T.clone().requires_grad_(), case.old_T, case.ref_T, case.rewards_B, case.cu, case.tadv_T, 3,
            0.2, 0.28, 0.1, "k3", "token-mean", "std", True, None, _given_advantages(gen, 6))
    torch.library.opcheck(torch.ops.nova_rt.grpo_loss.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"advantages must have shape \(6,\)"):
            grpo_loss(case.lp_T, case.old_T, None, case.rewards_B, case.cu, 3, advantages=torch.zeros(5), impl=impl)


@pytest.mark.parametrize("agg", AGGS)
def test_given_advantages_all_empty(agg):
    """T = 0: zero loss, empty gradient, finite stats over the given advantages, on both paths."""
    adv_B = torch.tensor([1.0, -1.0, 0.5, 0.0])
    for impl in IMPLS:
        lp = torch.empty(0, requires_grad=True)
        loss, stats = grpo_loss(lp, torch.empty(0), None, torch.zeros(4), torch.zeros(5, dtype=torch.int32), 2,
                                agg=agg, advantages=adv_B, impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and lp.grad.shape == (0,), impl
        assert math.isclose(stats["adv_mean"].item(), 0.125, rel_tol=1e-6), impl
