"""Packed training is exact: packed vs one-document-at-a-time loss and gradients (fp32, rel err <= 1e-5) on a tiny
Llama and a tiny Qwen2 with length-1 documents, and micro-batch invariance for each loss reduction.

The unpacked reference is independent of nova_rt's kernels: plain HF forward (SDPA) on each document alone,
full logits, log_softmax, gather.
"""

import os

import numpy as np
import pytest
import torch

from nova_rt.data.chat import IGNORE, Sample
from nova_rt.data.packing import collate, loss_weights, pack_samples
from nova_rt.models.causal import CausalLMLogprobs, batch_logprobs
from nova_rt.models.loading import set_attention
from nova_rt.models.tiny import build_tiny_model

SEED = int.from_bytes(os.urandom(4), "little")


def _docs(rng, lengths, vocab):
    out = []
    for n in lengths:
        ids = rng.integers(3, vocab, size=n)
        tg = np.full(n, IGNORE)
        tg[:-1] = np.where(rng.random(n - 1) < 0.7, ids[1:], IGNORE)
        out.append(Sample(ids.astype(np.int64), tg.astype(np.int64)))
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _reference_loss(model, docs, weights_per_doc):
    """Sum over documents of -sum(w * logp), each document run alone through the plain HF forward."""
    total = 0.0
    for d, w in zip(docs, weights_per_doc):
        ids = torch.from_numpy(d.input_ids).unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        tg = torch.from_numpy(d.targets)
        mask = tg != IGNORE
        lp = torch.zeros(len(tg), dtype=torch.float64)
        lp[mask] = logp[mask].gather(1, tg[mask].unsqueeze(1)).squeeze(1)
        total = total - (lp * torch.from_numpy(w)).sum()
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_equals_unpacked(arch):
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    model = build_tiny_model(arch, seed=SEED % 1000, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96)
    lengths = [1, int(rng.integers(2, 40)), 1, int(rng.integers(40, 90)), int(rng.integers(2, 9)), 1, 17]
    docs = _docs(rng, lengths, model.config.vocab_size)
    rows, _ = pack_samples(docs, max_tokens=128)
    weights = loss_weights(rows, "token")
    # Packed: nova attention through CausalLMLogprobs.
    set_attention(model, "nova")
    wrapped = CausalLMLogprobs(model)
    loss_p = sum(-(batch_logprobs(wrapped, collate([r], [w]))["logprobs"] * torch.from_numpy(w).float()).sum()
                 for r, w in zip(rows, weights))
    loss_p.backward()
    g_packed = _grads(model)
    model.zero_grad()
    # Unpacked reference: same documents, same weights, one at a time through SDPA.
    set_attention(model, "sdpa")
    n_sup = sum(int((d.targets != IGNORE).sum()) for d in docs)
    loss_u = _reference_loss(model, docs, [(d.targets != IGNORE) / n_sup for d in docs])
    loss_u.backward()
    g_ref = _grads(model)
    assert abs(loss_p.item() - loss_u.item()) <= 1e-5 * abs(loss_u.item()), (SEED, loss_p.item(), loss_u.item())
    assert g_packed.keys() == g_ref.keys()
    worst = max(g_ref, key=lambda n: _rel(g_packed[n], g_ref[n]))
    assert _rel(g_packed[worst], g_ref[worst]) <= 1e-5, (SEED, worst, _rel(g_packed[worst], g_ref[worst]))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_micro_batch_invariance(reduction):
    rng = np.random.default_rng(SEED)
    model = build_tiny_model("llama", seed=SEED % 997, hidden=48, layers=2, heads=4, kv_heads=2, intermediate=64)
    set_attention(model, "nova")
    wrapped = CausalLMLogprobs(model)
    docs = _docs(rng, rng.integers(1, 50, size=24).tolist(), model.config.vocab_size)
    rows, _ = pack_samples(docs, max_tokens=64)
    assert len(rows) >= 6
    weights = loss_weights(rows, reduction)
    results = []
    for splits in (1, 2, 3, len(rows)):
        model.zero_grad()
        chunks = np.array_split(np.arange(len(rows)), splits)
        total = 0.0
        for idx in chunks:
            mb = collate([rows[i] for i in idx], [weights[i] for i in idx])
            loss = -(batch_logprobs(wrapped, mb)["logprobs"] * mb["weights"]).sum()
            loss.backward()
            total += loss.item()
        results.append((total, _grads(model)))
    base_loss, base_g = results[0]
    for total, g in results[1:]:
        assert abs(total - base_loss) <= 1e-5 * abs(base_loss), (SEED, total, base_loss)
        for n in base_g:
            assert _rel(g[n], base_g[n]) <= 1e-5, (SEED, reduction, n, _rel(g[n], base_g[n]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_group_checkpointing_same_gradients(k):
    from nova_rt.models.checkpointing import apply_group_checkpointing

    rng = np.random.default_rng(SEED)
    docs = _docs(rng, rng.integers(1, 40, size=8).tolist(), 320)
    rows, _ = pack_samples(docs, max_tokens=128)
    mb = collate(rows, loss_weights(rows, "token"))
    results = []
    for ckpt in (0, k):
        model = build_tiny_model("qwen2", seed=SEED % 991, hidden=48, layers=4, heads=4, kv_heads=2,
                                 intermediate=64)
        set_attention(model, "nova")
        if ckpt:
            assert apply_group_checkpointing(model.get_decoder().layers, ckpt) == -(-4 // ckpt)
        loss = -(batch_logprobs(CausalLMLogprobs(model), mb)["logprobs"] * mb["weights"]).sum()
        loss.backward()
        results.append((loss.item(), _grads(model), set(model.state_dict())))
    (l0, g0, keys0), (l1, g1, keys1) = results
    assert keys0 == keys1  # parameter names (and so checkpoints and HF saves) are unchanged
    assert l0 == pytest.approx(l1, rel=1e-6)
    for n in g0:
        assert _rel(g1[n], g0[n]) <= 1e-5, (SEED, k, n)


def test_lr_schedule_shapes():
    from nova_rt.lr_schedule import lr_lambda

    f = lambda s, kind: lr_lambda(s, warmup=4, total=20, kind=kind, min_ratio=0.1)
    assert [f(s, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, "cosine") == pytest.approx(1.0) and f(20, "cosine") == pytest.approx(0.1)
    assert f(12, "linear") == pytest.approx(0.1 + 0.9 * 0.5) and f(12, "cosine") == pytest.approx(0.55)
    assert f(15, "constant") == 1.0
    with pytest.raises(ValueError, match="scheduler"):
        lr_lambda(5, warmup=0, total=10, kind="exp", min_ratio=0.0)
