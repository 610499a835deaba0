"""GRPO's shared-prefix training layout (pack_responses(shared_prefix=True) + SharedPrefixLayout in nova_packed):
each prompt once, its responses attending to it and not to each other.

Oracle: the HF model run on every prompt+response sequence alone with transformers' own SDPA attention, float64
log-softmax at the response tokens; gradients of a random weighting of those log-probs w.r.t. every parameter.
"""

import os

import pytest
import torch

from nova_rt.data.chat import IGNORE
from nova_rt.models.attention import SharedPrefixLayout
from nova_rt.models.loading import set_attention
from nova_rt.models.tiny import build_tiny_model
from nova_rt.stages.grpo import PolicyLogprobs, pack_responses
from tests.helpers import assert_close_verbose

V = 40


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def test_layout_mask_by_hand():
    """prefix of 2, responses of 1 and 3 tokens: rows 0-1 causal in the prefix; row 2 sees the prefix and itself;
    rows 3-5 see the prefix and their own segment causally."""
    lay = SharedPrefixLayout.build([(2, [1, 3]), (0, [2])])
    assert lay.spans == [(0, 6), (6, 8)]
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 0, 1, 0, 0],
                         [1, 1, 0, 1, 1, 0],
                         [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(lay.mask(0), want)
    assert torch.equal(lay.mask(1), torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))


def _groups(gen) -> tuple[list[list[int]], list[list[int]]]:
    """Adjacent groups with prompt lengths 1..8 (one prompt repeated in two adjacent groups), responses of 0..6
    tokens (empty ones included), group sizes 1..4."""
    prompts, responses = [], []
    shared = torch.randint(3, V, (5,), generator=gen).tolist()
    for plen, size in [(1, 3), (8, 2), (5, 4), (None, 2), (None, 1), (3, 1), (2, 3)]:
        p = shared if plen is None else torch.randint(3, V, (plen,), generator=gen).tolist()
        for _ in range(size):
            n = int(torch.randint(0, 7, (1,), generator=gen))
            prompts.append(p)
            responses.append(torch.randint(3, V, (n,), generator=gen).tolist())
    responses[1] = []  # an empty response inside a group
    responses[2] = [int(torch.randint(3, V, (1,), generator=gen))]  # a one-token response
    return prompts, responses


def _oracle(hf, prompts, responses, tau: float) -> torch.Tensor:
    """Flat (n_targets,) log-probs, each prompt+response forwarded alone with HF's SDPA attention."""
    impl = hf.config._attn_implementation
    hf.set_attn_implementation("sdpa")
    try:
        out = []
        for p, r in zip(prompts, responses):
            if not r:
                continue
            ids = torch.tensor([p + r[:-1]])
            logits = hf(input_ids=ids).logits[0, len(p) - 1:].double() / tau
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None])[:, 0])
        return torch.cat(out)
    finally:
        hf.set_attn_implementation(impl)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_equals_separate_sequences(arch):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    hf = build_tiny_model(arch, seed=seed % 1000, dtype=torch.float64, vocab_size=V, hidden=32, layers=2, heads=4,
                          kv_heads=2, intermediate=48)
    set_attention(hf, "nova")
    prompts, responses = _groups(gen)
    mb = pack_responses(prompts, responses, shared_prefix=True)
    plain = pack_responses(prompts, responses)
    n_targets = sum(len(r) for r in responses)
    assert int((mb.targets != IGNORE).sum()) == n_targets
    assert torch.equal(mb.response_cu_seqlens, plain.response_cu_seqlens)
    assert mb.input_ids.numel() < plain.input_ids.numel()
    tau = 0.8
    model = PolicyLogprobs(hf)
    w = torch.rand(n_targets, generator=gen, dtype=torch.float64) + 0.5

    lp = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.targets,
               temperature=tau, shared_prefix=mb.shared_prefix)["logprobs"]
    grads = torch.autograd.grad((lp.double() * w).sum(), list(hf.parameters()), allow_unused=True)
    want = _oracle(hf, prompts, responses, tau)
    want_grads = torch.autograd.grad((want * w).sum(), list(hf.parameters()), allow_unused=True)
    # the op returns fp32 log-probs (its contract): fp32 rounding of values ~4 is the floor
    assert_close_verbose(lp.double(), want, rtol=1e-6, atol=1e-6, name=f"seed {seed} log-probs")
    for (name, _), g, e in zip(hf.named_parameters(), grads, want_grads):
        if e is None:
            assert g is None or not g.any(), name
            continue
        assert_close_verbose(g, e, rtol=1e-5, atol=1e-6, name=f"seed {seed} grad {name}")


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_responses([[]], [[3, 4]], shared_prefix=True)
