"""grpo_loss against an independent float64 oracle (nova_rt.kernels.reference.grpo_loss_ref): a plain Python loop
over groups and responses, autograd for the gradient. Both the torch path and the Triton path (under
TRITON_INTERPRET=1 on CPU) are checked on every agg x kl x adv_norm combination; inputs are drawn afresh each run
(the seed is in every failure message).

Legend: T response tokens (flat), B responses, G group size.
"""

import math
import os
from dataclasses import dataclass

import pytest
import torch

from nova_rt.kernels.grpo_loss import STAT_NAMES, correction_weights, grpo_loss, grpo_loss_fwd
from nova_rt.kernels.reference import grpo_advantages_ref, grpo_loss_ref
from tests.helpers import assert_close_verbose, assert_no_worse_than_eager

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLS = ["k1", "k2", "k3"]
NORMS = ["std", "none"]
IMPLS = ["torch", "triton"]
# (beta, has_ref, has_token_adv, eps_low, eps_high, group_size): every combination sees G = 1, 3, 4, beta 0 with and
# without ref, beta > 0, symmetric and clip-higher eps, token_adv on and off.
CONFIGS = [(0.0, False, False, 0.2, 0.2, 3), (0.0, True, True, 0.2, 0.28, 4), (0.1, True, False, 0.2, 0.28, 1),
           (0.3, True, True, 0.2, 0.2, 3)]


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@dataclass
class Case:
    lp_T: torch.Tensor
    old_T: torch.Tensor
    ref_T: torch.Tensor | None
    rewards_B: torch.Tensor
    cu: torch.Tensor
    tadv_T: torch.Tensor | None
    G: int


def _away_from(x_T: torch.Tensor, points: list[float], margin: float) -> torch.Tensor:
    return torch.stack([(x_T - p).abs() < margin for p in points]).any(0)


def _make_case(gen, *, n_prompts, G, dtype=torch.float32, has_ref=True, has_tadv=False, eps=(0.2, 0.2),
               max_len=48, equal_frac=0.25) -> Case:
    """Ragged responses (with length-0 and length-1 ones), ratios in [0.22, 4.5] (both clip sides active), ref such
    that the k3 clamp at 10 is hit; values are nudged away from the clip/clamp boundaries so fp32 and fp64 agree."""
    B = n_prompts * G
    len_B = torch.randint(2, max_len, (B,), generator=gen)
    u = torch.rand(B, generator=gen)
    len_B[u < 0.15], len_B[u > 0.88] = 1, 0
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = len_B.cumsum(0)
    cu = cu.to(torch.int32 if torch.rand(1, generator=gen).item() < 0.5 else torch.int64)
    T = int(cu[-1])
    lp = (-3 * torch.rand(T, generator=gen)).to(dtype)
    old = (lp.double() - (3 * torch.rand(T, generator=gen) - 1.5)).to(dtype)
    ref = (lp.double() + (8 * torch.rand(T, generator=gen) - 4)).to(dtype)
    bounds = [math.log(1 - eps[0]), math.log(1 + eps[1])]
    for _ in range(50):
        bad = _away_from(lp.double() - old.double(), bounds, 1e-3)
        d = ref.double() - lp.double()
        bad_k3 = ((d.exp() - d - 1) - 10).abs() < 1e-2
        if not (bad.any() or bad_k3.any()):
            break
        old[bad] = (old[bad].double() - 0.05).to(dtype)
        ref[bad_k3] = (ref[bad_k3].double() + 0.05).to(dtype)
    rewards = torch.randn(B, generator=gen)
    equal = torch.rand(n_prompts, generator=gen) < equal_frac
    r_PG = rewards.view(n_prompts, G)
    r_PG[equal] = r_PG[equal][:, :1].expand(-1, G).clone()
    tadv = 0.3 * torch.randn(T, generator=gen) if has_tadv else None
    return Case(lp, old, ref if has_ref else None, rewards, cu, tadv, G)


def _oracle(case: Case, isw_T: torch.Tensor | None = None, **kw) -> dict:
    return grpo_loss_ref(case.lp_T, case.old_T, case.ref_T, case.rewards_B, case.cu, case.G, case.tadv_T,
                         is_T=isw_T, **kw)


def _run(case: Case, impl: str, upstream: float = 1.0, isw_T: torch.Tensor | None = None, **kw):
    lp = case.lp_T.clone().requires_grad_()
    loss, stats = grpo_loss(lp, case.old_T, case.ref_T, case.rewards_B, case.cu, case.G, token_adv=case.tadv_T,
                            is_weights=isw_T, impl=impl, **kw)
    (loss * upstream).backward()
    return loss, stats, lp.grad


def _check(case: Case, impl: str, ctx: str, isw_T: torch.Tensor | None = None, **kw) -> None:
    want = _oracle(case, isw_T, **kw)
    loss, stats, grad = _run(case, impl, isw_T=isw_T, **kw)
    T = want["T"]
    assert loss.dtype == torch.float32 and loss.dim() == 0, ctx
    assert abs(loss.item() - want["loss"]) <= 1e-5 * want["scale"] + 1e-7, f"loss {loss.item()} vs {want['loss']} {ctx}"
    assert set(stats) == set(STAT_NAMES), ctx
    for name, v in stats.items():
        assert v.dim() == 0 and not v.requires_grad and math.isfinite(v.item()), f"stat {name} {ctx}"
    assert round(stats["clip_frac"].item() * T) == want["n_clip"], f"clip_frac {stats['clip_frac']} {want} {ctx}"
    for name in ("kl_mean", "adv_mean", "adv_std", "ratio_mean"):
        got, ref = stats[name].item(), want["stats"][name]
        assert abs(got - ref) <= 1e-5 * (abs(ref) + 1.0), f"{name} {got} vs {ref} {ctx}"
    assert grad.dtype == case.lp_T.dtype, ctx
    if T:
        peak = want["grad"].abs().max().item()
        fp32 = case.lp_T.dtype == torch.float32
        assert_close_verbose(grad, want["grad"], rtol=1e-4 if fp32 else 4e-3, atol=(1e-5 if fp32 else 2e-3) * peak,
                             name=f"d logprobs {ctx}")


@pytest.mark.parametrize("adv_norm", NORMS)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("agg", AGGS)
def test_matches_oracle(agg, kl, adv_norm):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for beta, has_ref, has_tadv, eps_low, eps_high, G in CONFIGS:
        case = _make_case(gen, n_prompts=int(torch.randint(2, 7, (1,), generator=gen)), G=G, has_ref=has_ref,
                          has_tadv=has_tadv, eps=(eps_low, eps_high))
        kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl, agg=agg, adv_norm=adv_norm)
        for impl in IMPLS:
            _check(case, impl, f"[seed {seed} {impl} G={G} T={case.lp_T.numel()} {kw}]", **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_inputs(impl):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for agg, kl in zip(AGGS, KLS):
        case = _make_case(gen, n_prompts=4, G=3, dtype=torch.float16, has_tadv=True)
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.2, kl=kl, agg=agg, adv_norm="std")
        _check(case, impl, f"[seed {seed} {impl} fp16 {kw}]", **kw)


def test_test_data_clips_both_sides():
    """The generator must exercise both clip sides and the k3 clamp, or the oracle tests would prove little."""
    seed = _seed()
    case = _make_case(torch.Generator().manual_seed(seed), n_prompts=8, G=4, equal_frac=0.0)
    adv_T = torch.tensor(grpo_advantages_ref(case.rewards_B.tolist(), 4, "std"))
    adv_T = adv_T.repeat_interleave(case.cu.diff().long(), 0)
    ratio = (case.lp_T - case.old_T).exp()
    assert ((adv_T > 0) & (ratio > 1.2)).any() and ((adv_T < 0) & (ratio < 0.8)).any(), f"seed {seed}"
    d = case.ref_T - case.lp_T
    assert ((d.exp() - d - 1) > 10).any(), f"k3 clamp never active, seed {seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_equal_rewards_and_group_size_one_give_zero_advantage(impl):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for G, equal_frac in ((4, 1.0), (1, 0.0)):
        case = _make_case(gen, n_prompts=5, G=G, equal_frac=equal_frac)
        loss, stats, grad = _run(case, impl, beta=0.0, kl="k3", agg="seq-mean-token-mean", adv_norm="std")
        msg = f"seed {seed} G={G} {impl}"
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), msg
        assert stats["adv_mean"].item() == 0.0 and stats["adv_std"].item() == 0.0, msg
        assert stats["clip_frac"].item() == 0.0, msg
        # With beta > 0 only the KL term remains, and it must still match the oracle.
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.5, kl="k3", agg="token-mean", adv_norm="std")
        _check(case, impl, msg, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_responses(impl):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.1, kl="k2", agg="seq-mean-token-mean", adv_norm="none")
    case = _make_case(gen, n_prompts=3, G=2)
    case.cu = torch.cat([case.cu[:1], case.cu[:1], case.cu[1:-1], case.cu[-1:], case.cu[-1:]])  # empty first/last
    case.rewards_B = torch.cat([torch.randn(1, generator=gen), case.rewards_B, torch.randn(1, generator=gen)])
    _check(case, impl, f"[seed {seed} {impl} leading/trailing empty]", **kw)
    empty = Case(torch.empty(0), torch.empty(0), torch.empty(0), torch.randn(4, generator=gen),
                 torch.zeros(5, dtype=torch.int32), None, 2)
    for agg in AGGS:
        loss, stats, grad = _run(empty, impl, **{**kw, "agg": agg})
        assert loss.item() == 0.0 and grad.shape == (0,), f"{agg} {impl}"
        assert all(math.isfinite(v.item()) for v in stats.values()), f"{agg} {impl} {stats}"


@pytest.mark.parametrize("impl", IMPLS)
def test_clamped_log_ratios(impl):
    """|lp - old| > 20 and |ref - lp| > 20: finite loss, zero gradient on the clamped terms."""
    seed = _seed()
    case = _make_case(torch.Generator().manual_seed(seed), n_prompts=3, G=3, equal_frac=0.0)
    T = case.lp_T.numel()
    idx = torch.randperm(T, generator=torch.Generator().manual_seed(seed))[: max(T // 5, 1)]
    case.old_T[idx] = case.lp_T[idx] + torch.tensor([25.0, -25.0]).repeat(len(idx))[: len(idx)]
    case.ref_T[idx] = case.lp_T[idx] + torch.tensor([-30.0, 30.0, 3.0]).repeat(len(idx))[: len(idx)]
    for kl in KLS:
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, kl=kl, agg="token-mean", adv_norm="std")
        _check(case, impl, f"[seed {seed} {impl} clamps {kl}]", **kw)


def test_multi_block_launcher():
    """Small blocks: several token blocks, more partials than one reduction tile, more responses than BLOCK_B."""
    seed = _seed()
    case = _make_case(torch.Generator().manual_seed(seed), n_prompts=8, G=3, max_len=80, has_tadv=True)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, kl="k3", agg="seq-mean-token-sum-norm", adv_norm="std")
    want = _oracle(case, **kw)
    loss, dlp, stats = grpo_loss_fwd(case.lp_T, case.old_T, case.ref_T, case.rewards_B, case.cu, case.tadv_T, 3,
                                     kw["eps_low"], kw["eps_high"], kw["beta"], kw["kl"], kw["agg"], kw["adv_norm"],
                                     block_t=16, block_b=16, block_p=16)
    assert case.lp_T.numel() > 16 * 16, f"need > 16 blocks, T={case.lp_T.numel()} seed {seed}"
    assert abs(loss.item() - want["loss"]) <= 1e-5 * want["scale"], f"seed {seed}"
    assert round(stats[0].item() * want["T"]) == want["n_clip"], f"seed {seed}"
    assert_close_verbose(stats[1:], torch.tensor([want["stats"][k] for k in STAT_NAMES[1:]]), rtol=1e-5, atol=1e-5,
                         name=f"stats seed {seed}")
    assert_close_verbose(dlp, want["grad"], rtol=1e-4, atol=1e-5 * want["grad"].abs().max().item(),
                         name=f"dlp seed {seed}")


def test_upstream_gradient_and_no_grad_path():
    seed = _seed()
    case = _make_case(torch.Generator().manual_seed(seed), n_prompts=4, G=4, has_tadv=True)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, kl="k1", agg="token-mean", adv_norm="none")
    want = _oracle(case, **kw)
    loss, stats, grad = _run(case, "triton", upstream=-3.5, **kw)
    assert_close_verbose(grad, -3.5 * want["grad"], rtol=1e-4, atol=1e-5 * 3.5 * want["grad"].abs().max().item(),
                         name=f"scaled grad seed {seed}")
    with torch.no_grad():
        loss_ng, stats_ng = grpo_loss(case.lp_T.clone().requires_grad_(), case.old_T, case.ref_T, case.rewards_B,
                                      case.cu, 4, token_adv=case.tadv_T, impl="triton", **kw)
    assert loss_ng.item() == loss.item(), f"seed {seed}"
    assert all(stats_ng[k].item() == stats[k].item() for k in STAT_NAMES), f"seed {seed}"


def test_custom_op_registration():
    seed = _seed()
    case = _make_case(torch.Generator().manual_seed(seed), n_prompts=2, G=3, has_tadv=True)
    args = (case.lp_T.clone().requires_grad_(), case.old_T, case.ref_T, case.rewards_B, case.cu, case.tadv_T, 3,
            0.2, 0.28, 0.1, "k3", "seq-mean-token-mean", "std", True, 2 * torch.rand(case.lp_T.numel()))
    torch.library.opcheck(torch.ops.nova_rt.grpo_loss.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # The public function traces into one graph (no host sync under torch.compile) and matches eager.
    run = lambda lp: grpo_loss(lp, case.old_T, case.ref_T, case.rewards_B, case.cu, 3, beta=0.1, eps_high=0.28,
                               token_adv=case.tadv_T, impl="triton")[0]
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    lp_e, lp_c = case.lp_T.clone().requires_grad_(), case.lp_T.clone().requires_grad_()
    run(lp_e).backward()
    loss_c = compiled(lp_c)
    loss_c.backward()
    assert loss_c.item() == run(case.lp_T).item() and torch.equal(lp_c.grad, lp_e.grad), f"seed {seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs(impl):
    gen = torch.Generator().manual_seed(_seed())
    c = _make_case(gen, n_prompts=2, G=3)
    T = c.lp_T.numel()
    call = lambda **over: grpo_loss(**{**dict(logprobs=c.lp_T, old_logprobs=c.old_T, ref_logprobs=c.ref_T,
                                              rewards=c.rewards_B, cu_seqlens=c.cu, group_size=3, impl=impl),
                                       **over})
    with pytest.raises(ValueError, match="group_size"):
        call(group_size=4)
    with pytest.raises(ValueError, match="old_logprobs"):
        call(old_logprobs=c.old_T[:-1])
    with pytest.raises(ValueError, match="ref_logprobs"):
        call(ref_logprobs=torch.randn(T + 1))
    with pytest.raises(ValueError, match="token_adv"):
        call(token_adv=torch.randn(T, 2))
    with pytest.raises(ValueError, match="is_weights"):
        call(is_weights=torch.ones(T + 1))
    with pytest.raises(ValueError, match="ref_logprobs is None"):
        call(ref_logprobs=None, beta=0.1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=c.cu[:-1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=c.cu.float())
    bad_cu = c.cu.clone()
    bad_cu[-1] += 1
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=bad_cu)
    with pytest.raises(ValueError, match="kl"):
        call(kl="k4")
    with pytest.raises(ValueError, match="agg"):
        call(agg="sum")
    with pytest.raises(ValueError, match="adv_norm"):
        call(adv_norm="minmax")


# ----------------------------------------------------------------------------------------------- TIS weights
def _random_is_weights(gen, case: Case, cap: float = 2.0) -> torch.Tensor:
    """TIS-like weights min(exp(old - rollout), cap): a spread of values, about a third at the cap, some exactly 0."""
    rollout_T = case.old_T.double() + 1.2 * torch.randn(case.lp_T.numel(), generator=gen, dtype=torch.float64)
    w = torch.exp(case.old_T.double() - rollout_T).clamp(max=cap).float()
    w[torch.rand(w.shape, generator=gen) < 0.05] = 0.0
    return w


@pytest.mark.parametrize("impl", IMPLS)
def test_is_weights_match_oracle(impl):
    """Random per-token weights over several shapes (ragged, length-0 and length-1 responses, G = 1..4, a single
    length-1 response) against the fp64 oracle: loss, stats and d logprobs."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 3), (2, 1, 3), (3, 3, 48), (5, 4, 48), (2, 2, 200)]  # (prompts, G, max_len)
    modes = [("token-mean", "k3", "std"), ("seq-mean-token-mean", "k1", "none"),
             ("seq-mean-token-sum-norm", "k2", "std"), ("seq-mean-token-mean", "k3", "std"),
             ("token-mean", "k2", "none")]
    for (n_prompts, G, max_len), (agg, kl, norm) in zip(shapes, modes):
        case = _make_case(gen, n_prompts=n_prompts, G=G, max_len=max_len, has_tadv=G > 2)
        if n_prompts == 1 and G == 1:  # one response of one token
            case.cu, case.lp_T, case.old_T, case.ref_T = (case.cu.new_tensor([0, 1]), torch.tensor([-0.7]),
                                                          torch.tensor([-0.4]), torch.tensor([-1.9]))
            case.tadv_T = None
        isw = _random_is_weights(gen, case)
        for beta in (0.0, 0.2):
            kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, kl=kl, agg=agg, adv_norm=norm)
            _check(case, impl, f"[seed {seed} {impl} G={G} T={case.lp_T.numel()} {kw} tis]", isw_T=isw, **kw)


def test_is_weights_multi_block_launcher():
    """The Triton launcher with small blocks (weights loaded on full and masked blocks) against the oracle."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    case = _make_case(gen, n_prompts=6, G=3, max_len=80, has_tadv=True)
    isw = _random_is_weights(gen, case)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, kl="k3", agg="seq-mean-token-mean", adv_norm="std")
    want = _oracle(case, isw, **kw)
    loss, dlp, _ = grpo_loss_fwd(case.lp_T, case.old_T, case.ref_T, case.rewards_B, case.cu, case.tadv_T, 3,
                                 kw["eps_low"], kw["eps_high"], kw["beta"], kw["kl"], kw["agg"], kw["adv_norm"],
                                 block_t=16, block_b=16, block_p=16, is_weights_T=isw)
    assert abs(loss.item() - want["loss"]) <= 1e-5 * want["scale"] + 1e-7, f"seed {seed}"
    assert_close_verbose(dlp, want["grad"], rtol=1e-4, atol=1e-5 * want["grad"].abs().max().item(),
                         name=f"dlp seed {seed}")


@pytest.mark.parametrize("impl", IMPLS)
def test_unit_is_weights_equal_no_weights(impl):
    """Weights of exactly 1 change nothing, bit for bit (x * 1.0 is exact in fp32)."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for has_ref, beta in ((False, 0.0), (True, 0.3)):
        case = _make_case(gen, n_prompts=4, G=3, has_ref=has_ref, has_tadv=True)
        kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, kl="k3", agg="seq-mean-token-mean", adv_norm="std")
        loss0, stats0, grad0 = _run(case, impl, **kw)
        loss1, stats1, grad1 = _run(case, impl, isw_T=torch.ones(case.lp_T.numel()), **kw)
        msg = f"seed {seed} {impl} beta={beta}"
        assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1), msg
        assert all(torch.equal(stats0[k], stats1[k]) for k in STAT_NAMES), msg


def _trl_grpo_loss_fp64(lp_T, old_T, ref_T, sampling_T, rewards_B, cu, G, cap, eps_low, eps_high, beta, loss_type):
    """TRL 1.16 GRPOTrainer's loss (vllm_importance_sampling_mode="token_truncate", clip_min None, scale_rewards=
    "group", importance_sampling_level="token"), rewritten here on padded (B, L) tensors in float64 from
    trl/trainer/grpo_trainer.py (_generate_and_score_completions and _compute_loss); returns (loss, lp.grad)."""
    lens = (cu[1:] - cu[:-1]).tolist()
    B, L = len(lens), max(lens)
    mask = torch.zeros(B, L, dtype=torch.float64)
    pad = lambda x: torch.zeros(B, L, dtype=torch.float64).index_put_(  # noqa: E731
        (torch.arange(B).repeat_interleave(torch.tensor(lens)),
         torch.cat([torch.arange(n) for n in lens])), x.double())
    for i, n in enumerate(lens):
        mask[i, :n] = 1.0
    per_token_logps = pad(lp_T.detach()).requires_grad_()
    old, ref, sampling = pad(old_T), pad(ref_T), pad(sampling_T)
    r = rewards_B.double().view(-1, G)
    advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    importance_sampling_ratio = torch.clamp(torch.exp((old - sampling) * mask), max=cap)
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_loss = per_token_loss * importance_sampling_ratio
    per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    else:  # dr_grpo with max_completion_length = the longest response
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * L)
    loss.backward()
    grad_T = per_token_logps.grad[mask.bool()]
    return loss.item(), grad_T


@pytest.mark.parametrize("impl", IMPLS)
def test_tis_matches_trl_formula(impl):
    """correction_weights(token_truncate) + grpo_loss(is_weights=) against TRL's token_truncate formula written out
    independently above: the weight multiplies the clipped surrogate, the k3 KL is added unweighted, the weight
    carries no gradient."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    aggs = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
    for loss_type, agg in aggs.items():
        case = _make_case(gen, n_prompts=3, G=4, max_len=30, equal_frac=0.0)
        lens = torch.randint(1, 12, (12,), generator=gen)  # ragged, none empty (TRL's "grpo" mean counts those)
        case.cu = torch.cat([case.cu.new_zeros(1), lens.cumsum(0).to(case.cu.dtype)])
        T = int(case.cu[-1])
        case.lp_T = -3 * torch.rand(T, generator=gen)
        case.old_T = case.lp_T + 0.6 * torch.randn(T, generator=gen)
        case.ref_T = case.lp_T + 0.5 * torch.randn(T, generator=gen)  # k3 stays far below its cap of 10
        sampling_T = case.old_T + torch.randn(T, generator=gen)  # some exp(old - sampling) above the cap
        cap = 2.0
        want_loss, want_grad = _trl_grpo_loss_fp64(case.lp_T, case.old_T, case.ref_T, sampling_T, case.rewards_B,
                                                   case.cu, 4, cap, 0.2, 0.28, 0.15, loss_type)
        w, _ = correction_weights(case.old_T, sampling_T, case.cu, "token_truncate", cap)
        assert not w.requires_grad and (w == cap).any() and (w < 1).any(), f"seed {seed}"
        loss, _, grad = _run(case, impl, isw_T=w, eps_low=0.2, eps_high=0.28, beta=0.15, kl="k3", agg=agg,
                             adv_norm="std")
        msg = f"seed {seed} {impl} {loss_type}"
        assert abs(loss.item() - want_loss) <= 1e-5 * (abs(want_loss) + 1e-2), f"{loss.item()} vs {want_loss} {msg}"
        assert_close_verbose(grad, want_grad.float(), rtol=1e-4, atol=1e-6 * want_grad.abs().max().item(), name=msg)


def test_token_truncate_weights():
    old = torch.tensor([0.0, -1.0, -50.0, -0.2, -3.0], requires_grad=True)
    rollout = torch.tensor([0.0, -1.5, -1.0, -100.0, -1.0])
    w, dropped = correction_weights(old, rollout, torch.tensor([0, 2, 5]), "token_truncate", 2.5)
    want = torch.tensor([1.0, math.exp(0.5), math.exp(-49.0), 2.5, math.exp(-2.0)], dtype=torch.float32)
    assert w.dtype == torch.float32 and not w.requires_grad and not dropped.any()
    assert torch.allclose(w, want, rtol=1e-6, atol=0), w  # exp(99.8) overflows to inf: the cap makes it 2.5
    with pytest.raises(ValueError, match="cap"):
        correction_weights(old, rollout, torch.tensor([0, 5]), "token_truncate", 0.0)
    with pytest.raises(ValueError, match="shape"):
        correction_weights(old, rollout[:-1], torch.tensor([0, 5]), "token_truncate", 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
def test_cuda_matches_oracle(dtype, agg):
    """GPU tier: the Triton kernel's error against fp64 is at most 2x that of the torch path in the same dtype."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    case = _make_case(gen, n_prompts=64, G=4, dtype=dtype, max_len=1500, has_tadv=True)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, kl="k3", agg=agg, adv_norm="std")
    want = _oracle(case, **kw)
    cuda = Case(*(x.cuda() if isinstance(x, torch.Tensor) else x for x in vars(case).values()))
    got = _run(cuda, "triton", **kw)
    eager = _run(cuda, "torch", **kw)
    oracle_loss = torch.tensor(want["loss"], dtype=torch.float64)
    assert_no_worse_than_eager(got[0].cpu(), eager[0].cpu(), oracle_loss, name=f"loss seed {seed}")
    assert_no_worse_than_eager(got[2].cpu(), eager[2].cpu(), want["grad"], name=f"dlp seed {seed}")
    for name in STAT_NAMES:
        assert abs(got[1][name].item() - want["stats"][name]) <= 1e-4 * (abs(want["stats"][name]) + 1), name
