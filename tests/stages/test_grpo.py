"""The GRPO stage's integration of the loss (the kernel itself is tested in tests/kernels/test_grpo_loss.py).

Oracle: the HF model run on each prompt+response separately (no packing, transformers' own attention), float64
log-softmax over the full vocabulary, the group advantage, the top-k / k3 KL, the KL return-to-go in the token
reward, the clipped surrogate with kept old log-probs, the aggregation weights and the PTX penalty written out
directly; gradients by autograd. The stage's path packs the batch, runs nova's packed attention, the fused log-prob
op, reference_topk and grpo_loss, and splits the batch into micro-batches. Then the whole loop runs in a subprocess,
and a run killed with SIGKILL after a checkpoint resumes to the same final weights as an uninterrupted one.

Legend: T tokens, V vocab, K top-k ids, B responses, G group size.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nova_rt.backends.hf import HFPolicy, policy_outputs
from nova_rt.data.chat import Sample
from nova_rt.distributed import DistInfo
from nova_rt.errors import ConfigError
from nova_rt.models.loading import set_attention
from nova_rt.models.tiny import build_tiny_model
from nova_rt.rollout.base import RolloutConfig
from nova_rt.stages.grpo import (
    GRPOConfig,
    GRPODataConfig,
    GRPOLossConfig,
    GRPORun,
    PolicyLogprobs,
    PTXConfig,
    RolloutGroup,
    SamplingConfig,
)
from tests.helpers import assert_close_verbose
from tests.stages.grpo_loss_fns import make_loss_fn

ROOT = Path(__file__).resolve().parents[2]
V = 48


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _model(seed: int):
    m = build_tiny_model("llama", seed=seed, dtype=torch.float64, vocab_size=V, hidden=32, layers=2, heads=4,
                         kv_heads=2, intermediate=48)
    set_attention(m, "nova")
    return m


def _groups(gen, n_groups: int, G: int, equal_group: bool = True) -> list[RolloutGroup]:
    groups = []
    for j in range(n_groups):
        prompt = torch.randint(0, V, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
        resp = [torch.randint(0, V, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
                for _ in range(G)]
        rewards = torch.randn(G, generator=gen).tolist()
        if equal_group and j == 0:
            rewards = [rewards[0]] * G
        groups.append(RolloutGroup(prompt, resp, rewards))
    return groups


def _fake_run(g: GRPOConfig, policy, ref, ptx=None, shared: bool = False) -> GRPORun:
    """A GRPORun with only what micro_batches / ptx_micro_batches need (no model loading, no data)."""
    run = GRPORun.__new__(GRPORun)
    run.shared_prefix = shared
    run.grpo, run.ref, run.ptx, run.info = g, ref, ptx, DistInfo()
    run.dp_rank, run.dp_size = run.info.rank, run.info.world_size
    run.cfg = SimpleNamespace(run=SimpleNamespace(seed=3), train=SimpleNamespace(precision="fp32"))
    run.trainer = HFPolicy(run.cfg, run.info, policy, outputs=policy_outputs, trainable=False)
    run.ref = HFPolicy(run.cfg, run.info, ref, outputs=policy_outputs, trainable=False) if ref is not None else None
    return run


def _unpacked(model, ids: list[int], temperature: float) -> torch.Tensor:
    """(L-1, V) float64 log-softmax of next-token logits of one sequence, HF's own attention, no packing."""
    logits = model(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)


def _topk_kl(lp_pol, lp_ref, k):
    ids = torch.topk(lp_ref, k, dim=-1).indices
    p, q = torch.log_softmax(lp_pol.gather(-1, ids), -1), torch.log_softmax(lp_ref.gather(-1, ids), -1)
    return (p.exp() * (p - q)).sum(-1)


def _oracle_response_terms(g, groups, pol, ref, old_pol):
    """Per response: (logprobs with grad, old logprobs, KL_t for the loss (grad), KL_t of the old policy)."""
    out = []
    for grp in groups:
        for r in grp.responses:
            ids, n = grp.prompt + r, len(r)
            lp_full = _unpacked(pol, ids, g.sampling.temperature)[-n:]
            lp_old_full = _unpacked(old_pol, ids, g.sampling.temperature)[-n:].detach()
            lp_ref_full = _unpacked(ref, ids, g.sampling.temperature)[-n:].detach()
            tgt = torch.tensor(r)[:, None]
            lp, old, lref = (x.gather(1, tgt)[:, 0] for x in (lp_full, lp_old_full, lp_ref_full))
            if g.loss.kl == "topk":
                kl, kl_old = _topk_kl(lp_full, lp_ref_full, min(g.loss.topk, V)), _topk_kl(lp_old_full, lp_ref_full,
                                                                                         min(g.loss.topk, V))
            else:  # k3
                d, d_old = lref - lp, lref - old
                kl, kl_old = (d.exp() - d - 1).clamp(max=10), (d_old.exp() - d_old - 1).clamp(max=10)
            out.append((lp, old, kl, kl_old))
    return out


def _oracle_correction(r: RolloutConfig, old: torch.Tensor, rollout_lp: torch.Tensor) -> torch.Tensor:
    """grpo.rollout.correction's weight per token of one response, written out: ratio pi_old / pi_rollout per token
    (or the response's product on every token), truncated at the cap, zeroed above it (mask) or outside [low, high]
    (icepop)."""
    ratio = torch.exp(old - rollout_lp)
    if r.correction.startswith("sequence"):
        ratio = torch.exp((old - rollout_lp).sum()).expand(len(old))
    if r.correction.endswith("truncate"):
        return ratio.clamp(max=r.correction_cap)
    keep = (ratio >= r.correction_low) & (ratio <= r.correction_high) if r.correction == "icepop" else \
        ratio <= r.correction_cap
    return torch.where(keep, ratio, 0.0)


def oracle_loss(g: GRPOConfig, groups, pol, ref, old_pol, advantages=None) -> torch.Tensor:
    """The GRPO objective written out: group advantage + KL return-to-go (reward placement) or + beta KL (loss
    placement), clipped ratio against the old policy, global aggregation weights; with grpo.rollout.correction
    each token's clipped surrogate (not the KL) times the constant weight of _oracle_correction.
    advantages[g][i]: given per-response advantages instead of the group's (grpo.loss.advantage other than group)."""
    terms = _oracle_response_terms(g, groups, pol, ref, old_pol)
    lens = [len(r) for grp in groups for r in grp.responses]
    T, B, n_ne, lmax = sum(lens), len(lens), sum(x > 0 for x in lens), max(lens)
    rollout_lps = [lps for grp in groups for lps in grp.rollout_logprobs]
    loss, i = 0.0, 0
    for grp in groups:
        R = torch.tensor(grp.rewards, dtype=torch.float64)
        dev = R - R.mean()
        std = (dev.square().sum() / max(len(R) - 1, 1)).sqrt()
        A = dev / (std + 1e-4) if g.loss.adv_norm == "std" else dev
        if bool((R == R[0]).all()):
            A = torch.zeros_like(R)
        if advantages is not None:
            A = torch.tensor(advantages[groups.index(grp)], dtype=torch.float64)
        for a in A:
            lp, old, kl, kl_old = terms[i]
            n = lp.shape[0]
            w = {"token-mean": 1 / T, "seq-mean-token-mean": 1 / (n_ne * n),
                 "seq-mean-token-sum-norm": 1 / (B * lmax)}[g.loss.agg]
            adv = a.expand(n).clone()
            if g.loss.beta > 0 and g.loss.kl_placement == "reward":
                adv = adv - g.loss.beta * torch.flip(torch.cumsum(torch.flip(kl_old, [0]), 0), [0])
            ratio = torch.exp(lp - old)
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - g.loss.eps_low, 1 + g.loss.eps_high))
            if g.rollout.correction != "none":
                pg = pg * _oracle_correction(g.rollout, old, torch.tensor(rollout_lps[i], dtype=torch.float64))
            if g.loss.beta > 0 and g.loss.kl_placement == "loss":
                pg = pg + g.loss.beta * kl
            loss = loss + w * pg.sum()
            i += 1
    return loss


CASES = [  # (kl, placement, agg, adv_norm, beta, ppo_epochs, micro_prompts, shared-prefix layout)
    ("topk", "reward", "token-mean", "std", 0.3, 1, 0, True),
    ("topk", "reward", "seq-mean-token-mean", "std", 0.3, 2, 1, False),
    ("topk", "loss", "seq-mean-token-sum-norm", "none", 0.2, 1, 2, True),
    ("topk", "loss", "token-mean", "std", 0.2, 2, 1, False),
    ("k3", "loss", "token-mean", "std", 0.1, 2, 2, True),
    ("k3", "reward", "seq-mean-token-mean", "none", 0.5, 1, 1, False),
    ("k3", "loss", "seq-mean-token-sum-norm", "std", 0.0, 1, 0, True),
]


@pytest.mark.parametrize("kl, placement, agg, adv_norm, beta, ppo_epochs, micro, shared", CASES)
def test_stage_loss_equals_independent_formula(kl, placement, agg, adv_norm, beta, ppo_epochs, micro, shared):
    seed = _seed()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G = int(torch.randint(1, 4, (1,), generator=gen)) if micro != 2 else 3
    topk = int(torch.randint(1, V + 8, (1,), generator=gen))  # > V is capped at V
    g = GRPOConfig(sampling=SamplingConfig(group_size=G, temperature=0.7 if ppo_epochs == 1 else 1.0),
                   data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                   loss=GRPOLossConfig(kl=kl, kl_placement=placement, agg=agg, adv_norm=adv_norm, beta=beta, topk=topk,
                                       eps_low=0.2, eps_high=0.28),
                   ppo_epochs=ppo_epochs, micro_prompts=micro)
    pol_hf, ref_hf = _model(seed % 1000), _model(seed % 1000 + 1)
    old_hf = _model(seed % 1000)
    policy, ref = PolicyLogprobs(pol_hf), PolicyLogprobs(ref_hf)
    groups = _groups(gen, 4, G)
    mbs = _fake_run(g, policy, ref, shared=shared).micro_batches(groups)
    assert len(mbs) == (1 if micro == 0 else -(-4 // micro)), f"seed {seed}"
    if ppo_epochs > 1:  # old log-probs were kept from the rollout policy; move the policy so the ratio is not 1
        with torch.no_grad():
            for p in pol_hf.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    loss_fn = make_loss_fn(g, g.sampling.temperature)
    got = sum(loss_fn(policy, mb)[0] for mb in mbs)
    got.backward()
    pol_ref_hf = _model(seed % 1000)  # an independent copy of the moved policy for the oracle's autograd
    pol_ref_hf.load_state_dict(pol_hf.state_dict())
    expect = oracle_loss(g, groups, pol_ref_hf, ref_hf, old_hf)
    expect.backward()
    msg = f"seed {seed} case {kl, placement, agg, adv_norm, beta, ppo_epochs, micro} G={G} k={topk}"
    # the stage computes log-probs and the loss in fp32, the oracle in fp64
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1), rtol=2e-5, atol=1e-7, name=msg)
    for (name, p), p_ref in zip(pol_hf.named_parameters(), pol_ref_hf.parameters()):
        assert_close_verbose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7, name=f"d {name} {msg}")


CORRECTION_CASES = [  # (correction, cap, low, high, placement, ppo_epochs, shared-prefix layout)
    ("token_truncate", 1.5, 0.5, 5.0, "loss", 1, True), ("sequence_mask", 2.0, 0.5, 5.0, "reward", 2, False),
    ("icepop", 3.0, 0.8, 1.3, "loss", 2, True)]  # the other two modes: tests/kernels/test_rollout_correction.py


@pytest.mark.parametrize("correction, cap, low, high, placement, ppo_epochs, shared", CORRECTION_CASES)
def test_rollout_correction_from_the_engine_logprobs_equals_independent_formula(correction, cap, low, high,
                                                                                  placement, ppo_epochs, shared):
    """grpo.rollout.correction: the engine's sampling log-probs carried by each group reach the loss in
    response-token order (shared-prefix layout or not, several micro-batches) and weight the clipped surrogate
    only; the logged weight sum and zeroed-token count are the oracle's."""
    seed = _seed()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G = 3
    g = GRPOConfig(sampling=SamplingConfig(group_size=G, temperature=0.7),
                   data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                   loss=GRPOLossConfig(kl="k3", kl_placement=placement, beta=0.2, eps_low=0.2, eps_high=0.28),
                   rollout=RolloutConfig(correction=correction, correction_cap=cap, correction_low=low,
                                         correction_high=high), ppo_epochs=ppo_epochs, micro_prompts=2)
    pol_hf, ref_hf, old_hf = _model(seed % 1000), _model(seed % 1000 + 1), _model(seed % 1000)
    policy, ref = PolicyLogprobs(pol_hf), PolicyLogprobs(ref_hf)
    # engine log-probs: the old policy's +- noise, so weights fall below, near and above the bounds
    groups = _groups(gen, 4, G)
    old_terms = iter(_oracle_response_terms(g, groups, old_hf, ref_hf, old_hf))
    groups = [replace(grp, rollout_logprobs=[(next(old_terms)[1] + 0.4 * torch.randn(len(r), generator=gen,
                                                                                       dtype=torch.float64)).tolist()
                                             for r in grp.responses]) for grp in groups]
    mbs = _fake_run(g, policy, ref, shared=shared).micro_batches(groups)
    if ppo_epochs > 1:
        with torch.no_grad():
            for p in pol_hf.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    loss_fn = make_loss_fn(g, g.sampling.temperature)
    outs = [loss_fn(policy, mb) for mb in mbs]
    got = sum(o[0] for o in outs)
    got.backward()
    pol_ref_hf = _model(seed % 1000)
    pol_ref_hf.load_state_dict(pol_hf.state_dict())
    expect = oracle_loss(g, groups, pol_ref_hf, ref_hf, old_hf)
    expect.backward()
    msg = f"seed {seed} {correction} placement {placement} ppo_epochs {ppo_epochs} shared {shared}"
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1), rtol=2e-5, atol=1e-7, name=msg)
    for (name, p), p_ref in zip(pol_hf.named_parameters(), pol_ref_hf.parameters()):
        assert_close_verbose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7, name=f"d {name} {msg}")
    # the logged sums are the oracle's: old log-probs of the rollout policy against the engine's
    weights = torch.cat([_oracle_correction(g.rollout, t[1], torch.tensor(lps, dtype=torch.float64))
                         for t, lps in zip(_oracle_response_terms(g, groups, old_hf, ref_hf, old_hf),
                                           [lps for grp in groups for lps in grp.rollout_logprobs])])
    w_sum, dropped = (sum(float(o[1][k]) for o in outs) for k in ("is_w_sum", "is_dropped"))
    assert abs(w_sum - weights.sum().item()) <= 1e-4 * max(weights.sum().item(), 1.0), (w_sum, weights, msg)
    assert dropped == (0 if correction.endswith("truncate") else int((weights == 0).sum())), (dropped, msg)
    if correction != "token_truncate":  # the case is not trivially the identity
        assert ((weights - 1).abs() > 1e-3).any() and (correction.endswith("truncate") or dropped > 0), msg


def test_rollout_correction_without_engine_logprobs_is_a_config_error():
    """A setup whose rollout carries no sampling log-probs cannot run a correction: exit 2 naming the key."""
    gen = torch.Generator().manual_seed(0)
    g = GRPOConfig(sampling=SamplingConfig(group_size=2), data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                   rollout=RolloutConfig(correction="sequence_mask"))
    pol, ref = PolicyLogprobs(_model(0)), PolicyLogprobs(_model(1))
    with pytest.raises(ConfigError, match=r"grpo\.rollout\.correction=sequence_mask: .*no sampling log-probs"):
        _fake_run(g, pol, ref).micro_batches(_groups(gen, 2, 2))
    g.rollout.correction = "none"  # without a correction the same groups are fine
    assert _fake_run(g, pol, ref).micro_batches(_groups(gen, 2, 2))


def test_ptx_term_equals_independent_formula():
    """+gamma * mean over SFT supervised tokens of the exact top-k KL to the reference (value and gradient)."""
    seed = _seed()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g = GRPOConfig(data=GRPODataConfig(gym_tasks=[{"name": "x"}]), ptx=PTXConfig(coef=0.7, batch=4, files=["x"]),
                   loss=GRPOLossConfig(topk=int(torch.randint(1, V + 1, (1,), generator=gen))))
    pol_hf, ref_hf = _model(seed % 1000), _model(seed % 1000 + 1)
    samples = []
    for n in [1, 5, 9, 3]:  # a length-1 sample has no target and must be harmless
        ids = torch.randint(0, V, (n,), generator=gen)
        tg = torch.full((n,), -100, dtype=torch.int64)
        if n > 1:
            tg[:-1] = torch.where(torch.rand(n - 1, generator=gen) < 0.6, ids[1:], -100)
            tg[n - 2] = ids[n - 1]
        samples.append(Sample(ids.numpy(), tg.numpy()))
    run = _fake_run(g, PolicyLogprobs(pol_hf), PolicyLogprobs(ref_hf), ptx=samples)
    (mb,) = run.ptx_micro_batches(int(torch.randint(0, 5, (1,), generator=gen)))
    got, stats = make_loss_fn(g, 1.0)(PolicyLogprobs(pol_hf), mb)
    got.backward()
    pol2 = _model(seed % 1000)
    total, kl_sum = 0, 0.0
    for s in samples:  # ptx_batch = all samples: each step uses every one of them (in some order)
        sup = torch.from_numpy(s.targets) != -100
        if not sup.any():
            continue
        ids = torch.from_numpy(s.input_ids)[None]
        lp_pol = torch.log_softmax(pol2(input_ids=ids).logits[0].double(), -1)
        lp_ref = torch.log_softmax(ref_hf(input_ids=ids).logits[0].double(), -1).detach()
        kl_sum = kl_sum + _topk_kl(lp_pol[sup], lp_ref[sup], min(g.loss.topk, V)).sum()
        total += int(sup.sum())
    expect = g.ptx.coef * kl_sum / total
    expect.backward()
    assert stats["ptx_tokens"] == total, f"seed {seed}"
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1), rtol=2e-5, atol=1e-8,
                         name=f"ptx seed {seed}")
    for (name, p), p2 in zip(pol_hf.named_parameters(), pol2.parameters()):
        assert_close_verbose(p.grad, p2.grad, rtol=1e-4, atol=1e-8, name=f"ptx d {name} seed {seed}")


def test_equal_rewards_give_zero_advantage_and_no_nan():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    pol_hf = _model(seed % 1000)
    for G in (1, 2, 5):
        groups = [replace(grp, rewards=[grp.rewards[0]] * G) for grp in _groups(gen, 3, G)]  # identical rewards
        g = GRPOConfig(sampling=SamplingConfig(group_size=G), data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                       loss=GRPOLossConfig(beta=0.0))
        (mb,) = _fake_run(g, PolicyLogprobs(pol_hf), None).micro_batches(groups)
        loss, _ = make_loss_fn(g, 1.0)(PolicyLogprobs(pol_hf), mb)
        loss.backward()
        assert loss.item() == 0.0, f"seed {seed} G={G}: loss {loss.item()}"
        for name, p in pol_hf.named_parameters():
            assert torch.isfinite(p.grad).all() and p.grad.abs().max() == 0, f"seed {seed} G={G}: d {name}"
            p.grad = None


# ----------------------------------------------------------------------------------------------- the whole loop
def _train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / "tiny_grpo.yaml"),
           "--set", f"run.dir={run_dir}", "--set", "train.num_threads=1", "--set", "logging.tensorboard=false",
           *[x for o in overrides for x in ("--set", o)]]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_grpo_steps_on_a_tiny_model(tmp_path):
    _finish(_train(tmp_path, "train.max_steps=2", "checkpoint.every=0"))
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "kl", "entropy", "clip_frac", "response_len",
                "rollout_time_s", "train_time_s", "ptx_kl", "loss", "eval_accuracy/add_sub", "weight/mul"):
        assert key in rows[0] and rows[0][key] == rows[0][key], f"{key} missing or NaN in {rows[0]}"
    assert rows[1]["kl"] > 0, "after one update the policy differs from the reference"
    final = json.loads((tmp_path / "eval_final.json").read_text())
    assert set(final) >= {"step", "eval_accuracy", "eval_accuracy/add_sub", "eval_accuracy/mul"}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final").config.vocab_size == 320


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    steps = ["train.max_steps=6", "checkpoint.every=2"]
    full = _train(tmp_path / "full", *steps)
    killed = _train(tmp_path / "killed", *steps)
    ckpt = tmp_path / "killed" / "checkpoints" / "step_00000002"
    t0 = time.time()
    while not ckpt.exists() and killed.poll() is None and time.time() - t0 < 600:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed after its checkpoint"
    assert not (tmp_path / "killed" / "final").exists()
    out = _finish(_train(tmp_path / "killed", *steps))
    assert "resumed from" in out, out[-3000:]
    _finish(full)
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):  # same rollouts, rewards and eval after the resume
        for key in ("reward_mean", "response_len", "kl", "loss", "ptx_kl"):
            assert ra[key] == rb[key], f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"
    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
