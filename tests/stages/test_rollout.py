"""The rollout decode loop (nova_rt/rollout/generate.py): shared prompt prefill, finished rows leaving the batch,
sampling filters and the private RNG.

Oracles: the HF model run on each prompt+response alone through the packed training forward (PolicyLogprobs, float64
model) for the per-token log-probs and the greedy argmax; a per-row Python loop over sorted float64 logits for the
top-k / top-p filter; a chi-square test of sampled token counts against the filtered softmax.

Legend: V vocab, G group size, N draws.
"""

import math
import os

import pytest
import torch

from nova_rt.models.loading import set_attention
from nova_rt.models.tiny import build_tiny_model, byte_tokenizer
from nova_rt.rollout.generate import RolloutGenerator, filter_logits
from nova_rt.stages.grpo import PolicyLogprobs, pack_responses
from tests.helpers import assert_close_verbose

V = 48


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _model(seed: int, arch: str = "llama"):
    m = build_tiny_model(arch, seed=seed, dtype=torch.float64, vocab_size=V, hidden=32, layers=2, heads=4,
                         kv_heads=2, intermediate=48)
    set_attention(m, "nova")
    return m


def _teacher_forced(hf, prompts, responses, tau: float) -> list[torch.Tensor]:
    """Per response: log p(token) at temperature tau and the max log-prob, each prompt+response on its own."""
    mb = pack_responses(prompts, responses)
    with torch.no_grad():
        lp = PolicyLogprobs(hf)(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen,
                                mb.targets, temperature=tau)["logprobs"]
    out, i = [], 0
    for r in responses:
        out.append(lp[i:i + len(r)])
        i += len(r)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sampled_logprobs_equal_teacher_forced(arch):
    """Prompts of lengths 1..9 (left padding), G samples from one prefill, rows leaving the batch at different
    steps: every sampled token's log-prob from the decode loop equals the one of a separate forward pass."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    hf = _model(seed % 1000, arch)
    tok = byte_tokenizer()
    prompts = [torch.randint(3, V, (n,), generator=gen).tolist() for n in (1, 6, 3, 9)]
    tau = 0.7
    rg = RolloutGenerator(hf, tok, max_new_tokens=7, temperature=tau, seed=seed, eos_token_ids=[5, 9, 11])
    ro = rg.generate(prompts, 3)
    assert hf.config._attn_implementation == "nova_packed", "generation must leave the training attention in place"
    assert ro.prompt_ids == [p for p in prompts for _ in range(3)]
    lens = [len(r) for r in ro.response_ids]
    assert all(1 <= n <= 7 for n in lens), lens
    for r, f in zip(ro.response_ids, ro.finished):
        assert f == (r[-1] in rg.eos) and not any(t in rg.eos for t in r[:-1]), f"seed {seed}: {r} {f}"
    want = _teacher_forced(hf, ro.prompt_ids, ro.response_ids, tau)
    for i, (got, exp) in enumerate(zip(ro.logprobs, want)):
        # the training op returns fp32 log-probs (its contract), so fp32 rounding of values ~4 is the floor
        assert_close_verbose(torch.tensor(got, dtype=torch.float64), exp, rtol=1e-6, atol=1e-6,
                             name=f"seed {seed} response {i} (len {lens[i]})")


def test_greedy_is_argmax_of_teacher_forced():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    hf = _model(seed % 1000)
    tok = byte_tokenizer()
    prompts = [torch.randint(3, V, (n,), generator=gen).tolist() for n in (4, 1, 7)]
    rg = RolloutGenerator(hf, tok, max_new_tokens=6, seed=seed, eos_token_ids=[7])
    ro = rg.generate(prompts, 2, greedy=True)
    assert ro.response_ids[0::2] == ro.response_ids[1::2], "greedy copies of one prompt must agree"
    set_attention(hf, "sdpa")
    for i, (p, r) in enumerate(zip(ro.prompt_ids, ro.response_ids)):
        with torch.no_grad():  # independent: each prompt+response alone, no cache, no padding
            logits = hf(input_ids=torch.tensor([p + r])).logits[0]
        for j, t in enumerate(r):  # token j must be the argmax one position earlier (ties up to 1e-9)
            row = logits[len(p) - 1 + j]
            assert row[t] >= row.max() - 1e-9, f"seed {seed}: response {i} token {j}={t}, argmax {row.argmax()}"


def _filter_oracle(row: list[float], top_k: int, top_p: float) -> list[bool]:
    """keep mask for one row: top-k by value with ties, then top-p on the renormalised survivors."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = [True] * len(row)
    if 0 < top_k < len(row):
        kth = row[order[top_k - 1]]
        keep = [x >= kth for x in row]
    if top_p < 1.0:
        z = [row[i] for i in order if keep[i]]
        m = max(z)
        tot = sum(math.exp(x - m) for x in z)
        mass = 0.0
        for i in order:
            if not keep[i]:
                continue
            if mass >= top_p:
                keep[i] = False
            mass += math.exp(row[i] - m) / tot
    return keep


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.6), (1, 0.3), (40, 0.999)])
def test_filter_logits_matches_oracle(top_k, top_p):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 33, generator=gen, dtype=torch.float64) * 2
    logits[0, 3] = logits[0, 4] = logits[0].max() + 1  # a tie at the top
    logits[1, :] = 0.5  # all equal
    got = torch.isfinite(filter_logits(logits, top_k=top_k, top_p=top_p))
    for i in range(logits.shape[0]):
        want = _filter_oracle(logits[i].tolist(), top_k, top_p)
        assert got[i].tolist() == want, f"seed {seed} row {i} top_k={top_k} top_p={top_p}"


def test_sampling_distribution_chi_square():
    """N draws of one step through the generator's sampler against the filtered, tempered softmax."""
    seed = _seed()
    hf = _model(seed % 1000)
    rg = RolloutGenerator(hf, byte_tokenizer(), max_new_tokens=1, temperature=0.8, top_k=9, top_p=0.95, seed=seed)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
    N = 20000
    tok, _ = rg._next(logits.expand(N, V), greedy=False)
    counts = torch.bincount(tok, minlength=V).double()
    keep = torch.tensor(_filter_oracle((logits[0] / 0.8).tolist(), 9, 0.95))
    p = torch.where(keep, (logits[0] / 0.8).softmax(0), 0.0)
    p = p / p.sum()
    assert counts[~keep].sum() == 0, f"seed {seed}: sampled a filtered token"
    e = N * p[keep]
    chi2 = ((counts[keep] - e) ** 2 / e).sum().item()
    dof = int(keep.sum()) - 1
    pval = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                   torch.tensor(chi2 / 2.0, dtype=torch.float64)).item() if dof > 0 else 1.0
    assert pval > 1e-6, f"seed {seed}: chi2 {chi2:.1f} on {dof} dof, p = {pval:.2e}"


def test_rng_state_resumes_sampling():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    hf = _model(seed % 1000)
    prompts = [torch.randint(3, V, (n,), generator=gen).tolist() for n in (2, 5)]
    rg = RolloutGenerator(hf, byte_tokenizer(), max_new_tokens=5, seed=seed)
    rg.generate(prompts, 2)
    state = rg.state_dict()
    b = rg.generate(prompts, 2)
    rg.load_state_dict(state)
    torch.manual_seed(seed + 1)  # the global RNG does not matter
    assert rg.generate(prompts, 2).response_ids == b.response_ids, f"seed {seed}"
    # batch_size splits the prompts into several decode calls and gives the same number of rows in order
    rg2 = RolloutGenerator(hf, byte_tokenizer(), max_new_tokens=5, seed=seed, batch_size=2)
    c = rg2.generate(prompts, 2)
    assert c.prompt_ids == [p for p in prompts for _ in range(2)]


def test_bad_input_errors():
    hf = _model(0)
    rg = RolloutGenerator(hf, byte_tokenizer(), max_new_tokens=3)
    with pytest.raises(ValueError, match="at least one token"):
        rg.generate([[4], []], 2)
    with pytest.raises(ValueError, match="group_size"):
        rg.generate([[4]], 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RolloutGenerator(hf, byte_tokenizer(), max_new_tokens=0)
