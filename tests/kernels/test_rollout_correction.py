"""grpo.rollout.correction's weights (nova_rt.kernels.grpo_loss.correction_weights) and the loss they weight, against
TRL 1.16's vllm_importance_sampling_mode on identical tensors: TRL's math written out below (runs in CI) and TRL's
own lines, executed from the installed trl (only where trl imports: .venv-bench); icepop against a float64 formula
(nova_rt.kernels.reference.correction_weights_ref). The loss runs on the torch path and the Triton path
(TRITON_INTERPRET=1 on CPU), values and gradients; ragged responses with empty and length-1 ones, engine log-probs
with NaNs (TRL: ratio 1). Inputs are drawn afresh each run (the seed is in every failure message).

Legend: T response tokens (flat), B responses, L padded completion length, G group size.
"""

import inspect
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from nova_rt.kernels.grpo_loss import correction_weights, grpo_loss
from nova_rt.kernels.reference import correction_weights_ref, grpo_loss_ref
from tests.helpers import assert_close_verbose
from tests.kernels.test_grpo_loss import IMPLS, _seed

TRL_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def _ragged(gen, B: int, *, empty: bool = True, max_len: int = 9) -> torch.Tensor:
    """cu_seqlens (B + 1,) int64 with length-1 responses and (if `empty`) empty ones."""
    lens = torch.randint(2, max_len, (B,), generator=gen)
    u = torch.rand(B, generator=gen)
    lens[u < 0.2] = 1
    if empty:
        lens[u > 0.85] = 0
    return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])


def _logprobs(gen, cu: torch.Tensor, nan_frac: float = 0.05):
    """(old, sampling) (T,) fp32: per-token log-ratios ~ N(0, 0.6) (token ratios on both sides of 1, several above
    a cap of 1.5-2, sequence products spread widely), a few NaN engine log-probs."""
    T = int(cu[-1])
    old = -3 * torch.rand(T, generator=gen)
    sampling = old - 0.6 * torch.randn(T, generator=gen)
    sampling[torch.rand(T, generator=gen) < nan_frac] = float("nan")
    return old, sampling


def _padded(x_T: torch.Tensor, cu: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    lens = (cu[1:] - cu[:-1]).tolist()
    out = torch.zeros(len(lens), max(max(lens), 1), dtype=dtype)
    for i, n in enumerate(lens):
        out[i, :n] = x_T[int(cu[i]):int(cu[i]) + n]
    return out


def _mask(cu: torch.Tensor) -> torch.Tensor:
    return _padded(torch.ones(int(cu[-1])), cu)


def trl_is_ratio_formula(old_BL, sampling_BL, mask_BL, mode: str, clip_max: float) -> torch.Tensor:
    """TRL 1.16's _generate_and_score_completions importance-sampling ratio (clip_min None), written out: the
    masked log-ratio (NaN -> 0) per token or summed per sequence, exponentiated, then clamped above at clip_max
    (*_truncate) or zeroed where it exceeds clip_max (*_mask). (B, L) or (B, 1)."""
    diff = torch.nan_to_num((old_BL - sampling_BL) * mask_BL, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, max=clip_max)
    return ratio.masked_fill(ratio > clip_max, 0.0)


def trl_is_ratio_own(old_BL, sampling_BL, mask_BL, mode: str, clip_max: float) -> torch.Tensor:
    """The same ratio from TRL's own lines: the importance-sampling block of the installed GRPOTrainer.
    _generate_and_score_completions, executed on these tensors (a trainer stub holds the four settings it reads)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer",
                                   reason="trl is not installed here (it lives in .venv-bench: make bench-deps)")
    src = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    start = src.index("if self.use_vllm and self.vllm_importance_sampling_correction:\n                mask =")
    end = src.index("# Compute the per-token log probabilities for the reference model", start)
    block = textwrap.dedent(" " * 12 + src[start:end])
    trainer = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                              vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=clip_max,
                              vllm_importance_sampling_clip_min=None)
    scope = {"self": trainer, "old_per_token_logps": old_BL, "sampling_per_token_logps": sampling_BL,
             "completion_mask": mask_BL, "tool_mask": None, "torch": torch, "math": math}
    exec(compile(block, "trl GRPOTrainer importance sampling", "exec"), scope)  # noqa: S102 (the installed trl)
    return scope["vllm_importance_sampling_ratio"]


def _flat(ratio_BX: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """TRL's (B, L) or (B, 1) ratio on the flat response tokens."""
    lens = (cu[1:] - cu[:-1]).tolist()
    return torch.cat([ratio_BX[i, :n] if ratio_BX.shape[1] > 1 else ratio_BX[i, :1].expand(n)
                      for i, n in enumerate(lens)]) if cu[-1] > 0 else ratio_BX.new_zeros(0)


def _check_weights_against(trl_ratio, mode: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for B, cap in ((13, 2.0), (7, 1.5), (1, 3.0)):
        cu = _ragged(gen, B)
        old, sampling = _logprobs(gen, cu)
        msg = f"seed {seed} {mode} B={B} cap={cap}"
        want = _flat(trl_ratio(_padded(old, cu), _padded(sampling, cu), _mask(cu), mode, cap), cu)
        got, dropped = correction_weights(old.clone().requires_grad_(), sampling, cu, mode, cap)
        assert got.dtype == torch.float32 and not got.requires_grad and got.shape == old.shape, msg
        assert_close_verbose(got, want, rtol=2e-6, atol=0.0, name=msg)
        assert torch.equal(dropped, (want == 0) & mode.endswith("mask")), msg
        ref_w, ref_dropped = correction_weights_ref(old, sampling, (cu[1:] - cu[:-1]).tolist(), mode, cap=cap)
        assert_close_verbose(got.double(), torch.tensor(ref_w, dtype=torch.float64), rtol=2e-6, atol=0.0, name=msg)
        assert dropped.tolist() == ref_dropped, msg


@pytest.mark.parametrize("mode", TRL_MODES)
def test_weights_equal_trl_formula(mode):
    _check_weights_against(trl_is_ratio_formula, mode, _seed())


@pytest.mark.parametrize("mode", TRL_MODES)
def test_weights_equal_trl_own_code(mode):
    _check_weights_against(trl_is_ratio_own, mode, _seed())


def test_trl_formula_spot_values():
    """The written-out formula on hand-computed values: cap 2, token log-ratios 0, ln 3, -ln 2 and one NaN."""
    old = torch.tensor([[0.0, math.log(3.0), -math.log(2.0)], [0.0, 0.0, 0.0]])
    sampling = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(trl_is_ratio_formula(old, sampling, mask, "token_truncate", 2.0),
                          torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]]))
    assert torch.allclose(trl_is_ratio_formula(old, sampling, mask, "token_mask", 2.0),
                          torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]]))
    assert torch.allclose(trl_is_ratio_formula(old, sampling, mask, "sequence_truncate", 2.0),
                          torch.tensor([[1.5], [1.0]]))
    assert torch.allclose(trl_is_ratio_formula(old, sampling, mask, "sequence_mask", 1.4),
                          torch.tensor([[0.0], [1.0]]))


def test_icepop_equals_fp64_formula():
    """icepop: the token's ratio where low <= ratio <= high (both bounds kept), 0 outside; against float64."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    cu = _ragged(gen, 40)
    old, sampling = _logprobs(gen, cu)
    for low, high in ((0.5, 5.0), (0.8, 1.25), (0.0, 2.0)):
        got, dropped = correction_weights(old, sampling, cu, "icepop", low=low, high=high)
        ratio = torch.nan_to_num(old.double() - sampling.double(), nan=0.0).exp()
        keep = (ratio >= low) & (ratio <= high)
        msg = f"seed {seed} [{low}, {high}]"
        assert_close_verbose(got.double(), torch.where(keep, ratio, 0.0), rtol=2e-6, atol=0.0, name=msg)
        assert torch.equal(dropped, ~keep) and (dropped.any() or low == 0.0), msg
        ref_w, ref_dropped = correction_weights_ref(old, sampling, (cu[1:] - cu[:-1]).tolist(), "icepop", low=low,
                                                    high=high)
        assert dropped.tolist() == ref_dropped, msg
    exact = torch.tensor([math.log(0.5), math.log(2.0)], dtype=torch.float64)
    got, dropped = correction_weights(exact.float(), torch.zeros(2), torch.tensor([0, 2]), "icepop", low=0.5, high=2.0)
    assert not dropped.any() and torch.allclose(got, torch.tensor([0.5, 2.0])), got  # the bounds themselves are kept


def _trl_loss_fp64(lp_T, old_T, ref_T, is_BX, rewards_B, cu, G, eps_low, eps_high, beta, loss_type):
    """TRL 1.16 GRPOTrainer._compute_loss (scale_rewards="group", importance_sampling_level="token") with a given
    vLLM importance-sampling ratio, written out on padded (B, L) float64 tensors; (loss, d loss / d lp flat)."""
    mask = _mask(cu).double()
    per_token_logps = _padded(lp_T.detach(), cu, torch.float64).requires_grad_()
    old, ref = _padded(old_T, cu, torch.float64), _padded(ref_T, cu, torch.float64)
    r = rewards_B.double().view(-1, G)
    advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages) * is_BX.double()
    per_token_loss = per_token_loss + beta * (torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:  # dapo with one micro-batch: the batch's tokens
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    return loss.item(), per_token_logps.grad[mask.bool()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", TRL_MODES)
def test_loss_with_correction_equals_trl(impl, mode):
    """correction_weights -> grpo_loss(is_weights=) equals TRL's loss with vllm_importance_sampling_mode on the same
    tensors (value and gradient): the weight multiplies the clipped surrogate only, zeroed tokens keep their place
    in the aggregation's denominators (grpo: per-response token means; dapo: the batch's tokens)."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    for loss_type, agg in (("grpo", "seq-mean-token-mean"), ("dapo", "token-mean")):
        G, B = 3, 12
        cu = _ragged(gen, B, empty=False, max_len=14)  # TRL's grpo mean counts empty responses: none here
        T = int(cu[-1])
        old, sampling = _logprobs(gen, cu, nan_frac=0.0)
        lp = old + 0.3 * torch.randn(T, generator=gen)
        ref = lp + 0.4 * torch.randn(T, generator=gen)
        rewards = torch.randn(B, generator=gen)
        cap = 1.6
        is_BX = trl_is_ratio_formula(_padded(old, cu), _padded(sampling, cu), _mask(cu), mode, cap)
        want_loss, want_grad = _trl_loss_fp64(lp, old, ref, is_BX, rewards, cu, G, 0.2, 0.28, 0.1, loss_type)
        w, dropped = correction_weights(old, sampling, cu, mode, cap)
        msg = f"seed {seed} {impl} {mode} {loss_type}"
        assert (w != 1).any() and (mode.endswith("truncate") or dropped.any()), msg
        x = lp.clone().requires_grad_()
        loss, _ = grpo_loss(x, old, ref, rewards, cu, G, eps_low=0.2, eps_high=0.28, beta=0.1, kl="k3", agg=agg,
                            adv_norm="std", is_weights=w, impl=impl)
        loss.backward()
        assert abs(loss.item() - want_loss) <= 1e-5 * (abs(want_loss) + 1e-2), f"{loss.item()} vs {want_loss} {msg}"
        assert_close_verbose(x.grad, want_grad.float(), rtol=1e-4, atol=1e-6 * want_grad.abs().max().item(), name=msg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", TRL_MODES + ["icepop"])
def test_loss_with_correction_equals_fp64_oracle(impl, mode):
    """Every mode through grpo_loss on ragged responses with empty and length-1 ones, against grpo_loss_ref fed the
    float64 weights of correction_weights_ref (value and gradient), with the KL in the loss and token advantages."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    G, B = 4, 16
    cu = _ragged(gen, B, max_len=20).to(torch.int32)
    T = int(cu[-1])
    old, sampling = _logprobs(gen, cu)
    lp = old + 0.3 * torch.randn(T, generator=gen)
    ref = lp + 0.4 * torch.randn(T, generator=gen)
    tadv = 0.3 * torch.randn(T, generator=gen)
    rewards = torch.randn(B, generator=gen)
    ref_w, _ = correction_weights_ref(old, sampling, (cu[1:] - cu[:-1]).tolist(), mode, cap=1.8, low=0.7, high=1.4)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, kl="k3", agg="seq-mean-token-mean", adv_norm="std")
    want = grpo_loss_ref(lp, old, ref, rewards, cu, G, tadv, is_T=torch.tensor(ref_w), **kw)
    w, _ = correction_weights(old, sampling, cu, mode, 1.8, 0.7, 1.4)
    x = lp.clone().requires_grad_()
    loss, _ = grpo_loss(x, old, ref, rewards, cu, G, token_adv=tadv, is_weights=w, impl=impl, **kw)
    loss.backward()
    msg = f"seed {seed} {impl} {mode}"
    assert abs(loss.item() - want["loss"]) <= 1e-5 * want["scale"] + 1e-7, f"{loss.item()} vs {want['loss']} {msg}"
    assert_close_verbose(x.grad, want["grad"].float(), rtol=1e-4, atol=1e-5 * want["grad"].abs().max().item(),
                         name=msg)


def test_bad_arguments_are_refused():
    old, cu = torch.zeros(3), torch.tensor([0, 1, 3])
    for mode, kw, match in (("token_truncate", {"cap": 0.0}, "cap"), ("sequence_mask", {"cap": -1.0}, "cap"),
                            ("icepop", {"low": 2.0, "high": 2.0}, "low < high"),
                            ("icepop", {"low": -0.1, "high": 2.0}, "low < high"), ("none", {}, "correction"),
                            ("token_clip", {}, "correction")):
        with pytest.raises(ValueError, match=match):
            correction_weights(old, old, cu, mode, **kw)
    with pytest.raises(ValueError, match="shape"):
        correction_weights(old, old[:-1], cu, "token_mask")
