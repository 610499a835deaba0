"""SimPO and ORPO (dpo.loss_type simpo / orpo): the stage's per-pair objective and its gradient equal float64
formulas written here on random ragged packed pairs; the DPO stage trains with them and builds no reference model;
the megatron backend gives the HF backend's numbers; TRL 1.16's own CPO (loss_type="simpo") and ORPO loss functions
give the same numbers on identical logits (only where trl imports: .venv-bench, `make bench-deps`); bad settings
are exit 2 naming both keys.

Formulas (m = sequence log-prob sum / response tokens, the mean token log-prob; ε label smoothing; λ = β for ORPO):
    simpo: z = β (m_w - m_l) - γ,  L = -(1 - ε) log σ(z) - ε log σ(-z) - nll_weight · m_w
    orpo:  L = -m_w - β log σ(lo(m_w) - lo(m_l)),  lo(m) = m - log(1 - e^m)
Gradients are the closed forms of these, written out (not autograd of a second implementation).

Legend: P pairs, S = 2P sequences (c0, r0, c1, r1, ...), T packed tokens, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nova_rt.data.chat import IGNORE
from nova_rt.losses.preference import DPOLoss, orpo_loss
from nova_rt.stages.dpo import PairBatch, dpo_loss_from_logprobs
from tests.helpers import assert_close_verbose
from tests.reliability_helpers import run_cli, tiny_config, write_jsonl

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_preference_new_losses seed: {SEED}")
REPO = Path(__file__).resolve().parents[2]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------------- ragged inputs
def ragged_pairs(gen: torch.Generator, n_pairs: int, dtype=torch.float64):
    """A PairBatch of n_pairs random packed pairs (prompt 1..9 tokens, response 1..17, every third sequence a
    one-token response, mean log-probs from about -8 to -1e-4) and its per-token log-probs (T,) as a leaf (zero
    off the response tokens, as the models' outputs are). Returns (mb, logprobs_T, [(first, count) per sequence])."""
    S = 2 * n_pairs
    prompt_S = torch.randint(1, 10, (S,), generator=gen)
    response_S = torch.randint(1, 18, (S,), generator=gen)
    response_S[::3] = 1
    lens_S = prompt_S + response_S
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens_S, 0)
    T = int(cu[-1])
    targets = torch.full((T,), IGNORE, dtype=torch.long)
    logprobs = torch.zeros(T, dtype=torch.float64)
    spans = []
    for s in range(S):
        first = int(cu[s]) + int(prompt_S[s]) - 1  # position t predicts token t + 1: the last prompt token's
        count = int(response_S[s])
        targets[first:first + count] = torch.randint(0, 50, (count,), generator=gen)
        scale = [1e-4, 0.05, 1.0, 8.0][int(torch.randint(0, 4, (1,), generator=gen))]
        logprobs[first:first + count] = -scale * 2 * torch.rand(count, generator=gen, dtype=torch.float64)
        spans.append((first, count))
    positions = torch.cat([torch.arange(int(n)) for n in lens_S])
    mb = PairBatch(input_ids=torch.randint(0, 50, (1, T), generator=gen), targets=targets,
                   position_ids=positions[None], cu_seqlens=cu, max_seqlen=int(lens_S.max()),
                   pair_ids=torch.arange(n_pairs), pair_weight=1.0 / (3 * n_pairs))
    return mb, logprobs.to(dtype).requires_grad_(), spans


def expected_simpo(logprobs_T, spans, weight, beta, gamma, smoothing, nll_weight):
    """(loss, d loss / d logprobs (T,)) in float64 from the closed forms."""
    lp = logprobs_T.detach().double().tolist()
    loss, grad = 0.0, [0.0] * len(lp)
    for p in range(len(spans) // 2):
        (fw, nw), (fl, nl) = spans[2 * p], spans[2 * p + 1]
        mw, ml = sum(lp[fw:fw + nw]) / nw, sum(lp[fl:fl + nl]) / nl
        z = beta * (mw - ml) - gamma
        loss += weight * (-(1 - smoothing) * _log_sigmoid(z) - smoothing * _log_sigmoid(-z) - nll_weight * mw)
        dz = -(1 - smoothing) * _sigmoid(-z) + smoothing * _sigmoid(z)  # d L / d z
        for t in range(fw, fw + nw):
            grad[t] = weight * (dz * beta - nll_weight) / nw
        for t in range(fl, fl + nl):
            grad[t] = -weight * dz * beta / nl
    return loss, torch.tensor(grad, dtype=torch.float64)


def expected_orpo(logprobs_T, spans, weight, beta):
    lp = logprobs_T.detach().double().tolist()
    loss, grad = 0.0, [0.0] * len(lp)
    for p in range(len(spans) // 2):
        (fw, nw), (fl, nl) = spans[2 * p], spans[2 * p + 1]
        mw, ml = sum(lp[fw:fw + nw]) / nw, sum(lp[fl:fl + nl]) / nl
        odds = (mw - math.log(-math.expm1(mw))) - (ml - math.log(-math.expm1(ml)))
        loss += weight * (-mw - beta * _log_sigmoid(odds))
        # d lo / d m = 1 + e^m / (1 - e^m) = -1 / expm1(m)
        d_odds = -beta * _sigmoid(-odds)
        for t in range(fw, fw + nw):
            grad[t] = weight * (-1.0 + d_odds * (-1.0 / math.expm1(mw))) / nw
        for t in range(fl, fl + nl):
            grad[t] = weight * (-d_odds * (-1.0 / math.expm1(ml))) / nl
    return loss, torch.tensor(grad, dtype=torch.float64)


SHAPES = [1, 2, 3, 5, 7, 13]


@pytest.mark.parametrize("n_pairs", SHAPES)
@pytest.mark.parametrize("beta, gamma, smoothing, nll_weight", [(2.0, 0.5, 0.0, 0.0), (0.3, 1.3, 0.2, 0.0),
                                                                (10.0, 0.0, 0.0, 0.7)])
def test_simpo_loss_and_gradient_equal_the_float64_formula(n_pairs, beta, gamma, smoothing, nll_weight):
    gen = torch.Generator().manual_seed(SEED + n_pairs)
    mb, logprobs_T, spans = ragged_pairs(gen, n_pairs)
    loss = DPOLoss(beta=beta, loss_type="simpo", label_smoothing=smoothing, simpo_gamma=gamma, nll_weight=nll_weight)
    got, stats = dpo_loss_from_logprobs({"logprobs": logprobs_T}, mb, loss)
    got.backward()
    want, want_grad = expected_simpo(logprobs_T, spans, mb.pair_weight, beta, gamma, smoothing, nll_weight)
    msg = f"seed {SEED} P={n_pairs} beta={beta} gamma={gamma}"
    assert abs(got.item() - want) <= 1e-12 * max(1.0, abs(want)), (msg, got.item(), want)
    on = mb.targets != IGNORE  # the stage sums whole documents: off the response the models' log-probs are 0
    assert_close_verbose(logprobs_T.grad[on], want_grad[on], rtol=1e-10, atol=1e-14, name=f"d loss / d lp {msg}")
    # the logged rewards are beta x the mean log-probs (TRL's CPO logs the same); nll the chosen's token-mean NLL
    means = [sum(logprobs_T.detach()[f:f + n].tolist()) / n for f, n in spans]
    assert math.isclose(stats["reward_chosen"], mb.pair_weight * beta * sum(means[0::2]), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(stats["nll"], -mb.pair_weight * sum(means[0::2]), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("n_pairs", SHAPES)
@pytest.mark.parametrize("beta", [0.1, 1.0, 4.0])
def test_orpo_loss_and_gradient_equal_the_float64_formula(n_pairs, beta):
    gen = torch.Generator().manual_seed(SEED + 100 + n_pairs)
    mb, logprobs_T, spans = ragged_pairs(gen, n_pairs)
    got, _ = dpo_loss_from_logprobs({"logprobs": logprobs_T}, mb, DPOLoss(beta=beta, loss_type="orpo"))
    got.backward()
    want, want_grad = expected_orpo(logprobs_T, spans, mb.pair_weight, beta)
    msg = f"seed {SEED} P={n_pairs} beta={beta}"
    assert abs(got.item() - want) <= 1e-12 * max(1.0, abs(want)), (msg, got.item(), want)
    on = mb.targets != IGNORE
    assert_close_verbose(logprobs_T.grad[on], want_grad[on], rtol=1e-9, atol=1e-14, name=f"d loss / d lp {msg}")


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_float32_path_matches_float64(loss_type):
    """The dtype training runs in: fp32 log-probs give the float64 formula's loss and gradient to fp32 precision."""
    gen = torch.Generator().manual_seed(SEED + 7)
    mb, lp64, spans = ragged_pairs(gen, 11)
    lp32 = lp64.detach().float().requires_grad_()
    loss = DPOLoss(beta=0.7, loss_type=loss_type, simpo_gamma=0.4 if loss_type == "simpo" else 0.0)
    got, _ = dpo_loss_from_logprobs({"logprobs": lp32}, mb, loss)
    got.backward()
    want, want_grad = (expected_simpo(lp32, spans, mb.pair_weight, 0.7, 0.4, 0.0, 0.0) if loss_type == "simpo"
                       else expected_orpo(lp32, spans, mb.pair_weight, 0.7))
    assert got.dtype == torch.float32 and abs(got.item() - want) <= 1e-5 * max(1.0, abs(want)), (SEED, got, want)
    on = mb.targets != IGNORE
    assert_close_verbose(lp32.grad[on], want_grad[on], rtol=1e-4, atol=1e-7, name=f"fp32 grad seed {SEED}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_is_finite_when_a_mean_log_prob_is_zero(dtype):
    """p = 1 in floating point (a one-token response the model is sure of): log(1 - p) would be -inf and the
    gradient NaN; the odds use m clamped to -eps, so loss and gradient stay finite, and the SFT term keeps its
    gradient -1 / |y_w| on the chosen."""
    chosen = torch.tensor([0.0, -0.3], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1.2, 0.0], dtype=dtype, requires_grad=True)
    loss_P = orpo_loss(chosen, rejected, beta=0.5)
    loss_P.sum().backward()
    assert torch.isfinite(loss_P).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert chosen.grad[0].item() == -1.0  # the odds term is flat above the clamp; the NLL term is not
    assert rejected.grad[1].item() == 0.0


# ----------------------------------------------------------------------------------------------- TRL itself
def _trl_inputs(gen: torch.Generator, n_pairs: int):
    """Padded (2P, L, V) logits and labels (TRL's layout: chosen rows first, labels unshifted with -100 on the prompt
    and padding) and nova_rt's packed PairBatch of the same sequences with the log-probs of the same logits."""
    V, S = 11, 2 * n_pairs
    prompt = torch.randint(1, 6, (S,), generator=gen)
    response = torch.randint(1, 9, (S,), generator=gen)
    response[::3] = 1
    L = int((prompt + response).max())
    logits = (3 * torch.randn(S, L, V, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.full((S, L), IGNORE, dtype=torch.long)
    order = [i for p in range(n_pairs) for i in (p, n_pairs + p)]  # TRL row of packed sequence s (c0, r0, c1, ...)
    for i in range(S):
        labels[i, prompt[i]:prompt[i] + response[i]] = torch.randint(0, V, (int(response[i]),), generator=gen)
    lp_all = torch.log_softmax(logits, -1)
    pieces, targets, cu = [], [], [0]
    for i in order:
        n = int(prompt[i] + response[i])
        tgt = torch.full((n,), IGNORE, dtype=torch.long)
        tgt[:-1] = labels[i, 1:n]
        mask = tgt != IGNORE
        pieces.append(torch.where(mask, lp_all[i, :n].gather(1, tgt.clamp(min=0)[:, None])[:, 0], 0.0))
        targets.append(tgt)
        cu.append(cu[-1] + n)
    T = cu[-1]
    mb = PairBatch(input_ids=torch.zeros(1, T, dtype=torch.long), targets=torch.cat(targets),
                   position_ids=torch.zeros(1, T, dtype=torch.long), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                   max_seqlen=L, pair_ids=torch.arange(n_pairs), pair_weight=1.0 / n_pairs)
    return logits, labels, mb, torch.cat(pieces)


def _trl_trainer(cls, **attrs):
    """A trainer with only the attributes its loss function reads (no model, no data)."""
    from types import SimpleNamespace

    trainer = cls.__new__(cls)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"))
    trainer.__dict__.update(attrs)
    return trainer


@pytest.mark.parametrize("n_pairs", [1, 3, 6])
@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_preference_term_equals_trl(loss_type, n_pairs):
    """TRL 1.16's CPOTrainer.cpo_loss (loss_type="simpo") and ORPOTrainer.odds_ratio_loss, fed TRL's own
    get_batch_logps(average_log_prob=True) of the logits, against nova_rt's stage objective over the log-probs of
    the same logits: loss and d loss / d logits. TRL adds its NLL from the logits separately (CPO: cpo_alpha x the
    token mean over the batch's chosen tokens; ORPO: over prompt and response tokens), so the TRL side here adds the
    per-pair chosen NLL nova_rt uses (ORPO's paper form, SimPO's nll_weight), -mean_p m_w, to the preference term."""
    if loss_type == "simpo":
        trainer_module = pytest.importorskip("trl.experimental.cpo.cpo_trainer",
                                             reason="trl is not installed here (it lives in .venv-bench)")
        cls = trainer_module.CPOTrainer
    else:
        trainer_module = pytest.importorskip("trl.experimental.orpo.orpo_trainer",
                                             reason="trl is not installed here (it lives in .venv-bench)")
        cls = trainer_module.ORPOTrainer
    gen = torch.Generator().manual_seed(SEED + n_pairs)
    beta, gamma, nll_weight = 0.8, 0.6, 0.5
    logits, labels, mb, lp_T = _trl_inputs(gen, n_pairs)
    msg = f"seed {SEED} {loss_type} P={n_pairs}"

    means = cls.get_batch_logps(logits, labels, average_log_prob=True, is_encoder_decoder=False)
    chosen, rejected = means[:n_pairs], means[n_pairs:]
    if loss_type == "simpo":
        trainer = _trl_trainer(cls, alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.1, loss_type="simpo")
        losses, reward_chosen, _ = trainer.cpo_loss(chosen, rejected)
        expect = (losses - nll_weight * chosen).mean()
        ours = DPOLoss(beta=beta, loss_type="simpo", label_smoothing=0.1, simpo_gamma=gamma, nll_weight=nll_weight)
    else:
        trainer = _trl_trainer(cls, beta=beta)
        losses, reward_chosen, *_ = trainer.odds_ratio_loss(chosen, rejected)
        expect = (-chosen - losses).mean()
        ours = DPOLoss(beta=beta, loss_type="orpo")
    (grad_trl,) = torch.autograd.grad(expect, logits)

    got, stats = dpo_loss_from_logprobs({"logprobs": lp_T}, mb, ours)
    (grad_ours,) = torch.autograd.grad(got, logits)
    assert abs(got.item() - expect.item()) <= 1e-6 * max(1.0, abs(expect.item())), (msg, got.item(), expect.item())
    assert math.isclose(stats["reward_chosen"], float(reward_chosen.double().mean()), rel_tol=1e-6, abs_tol=1e-9)
    assert_close_verbose(grad_ours, grad_trl.double(), rtol=1e-5, atol=1e-9, name=f"d loss / d logits {msg}")


# ----------------------------------------------------------------------------------------------- the stage
NO_REFERENCE = """
import sys
import nova_rt.backends.hf as hf
import nova_rt.stages.dpo as dpo
from nova_rt.train import main

def refuse(*args, **kwargs):
    raise AssertionError("a reference model or reference log-probs were asked for")

hf.HFPolicy.reference = refuse
dpo.reference_table = dpo.compute_reference_logps = dpo.cached_reference_logps = refuse
sys.exit(main(sys.argv[1:]))
"""


def _stage_run(tmp_path: Path, loss_type: str, *extra: str) -> subprocess.CompletedProcess:
    lines = (REPO / "data/preference/arith_pairs.jsonl").read_text().splitlines()
    train = write_jsonl(tmp_path / "train.jsonl", random.Random(SEED).sample(lines, 16))
    evals = write_jsonl(tmp_path / "eval.jsonl",
                        (REPO / "data/preference/arith_pairs_eval.jsonl").read_text().splitlines()[:6])
    sets = [f"run.dir={tmp_path / 'run'}", f"data.train_files=[{train}]", f"data.eval_files=[{evals}]",
            f"dpo.loss_type={loss_type}", "train.max_steps=3", "train.eval_every=3", "checkpoint.every=0",
            "logging.tensorboard=false", "logging.plot=false", "packing.max_tokens=256", "data.max_seq_len=128",
            "train.num_threads=1", f"run.seed={SEED % 10000}", *extra]
    cmd = [sys.executable, "-c", NO_REFERENCE, "--config", str(REPO / "configs/tiny_dpo.yaml"),
           *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("loss_type, extra", [("simpo", ("dpo.beta=2.0", "dpo.simpo_gamma=0.3")),
                                              ("orpo", ("dpo.beta=0.2",))])
def test_dpo_stage_trains_without_a_reference(tmp_path, loss_type, extra):
    """configs/tiny_dpo.yaml (reference_logprobs: precompute) with simpo / orpo: three steps and the evals, with
    every way to a reference model (HFPolicy.reference, the precomputed table and its cache) made to fail; no
    reference log-prob cache in run.dir; the loss is the formula of the logged stats (mean log-probs = reward / β)."""
    res = _stage_run(tmp_path, loss_type, *extra)
    assert res.returncode == 0, f"seed {SEED}\n{res.stderr[-3000:]}"
    run = tmp_path / "run"
    assert not list(run.glob("ref_logps_*")), list(run.iterdir())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics[1:]:
        assert all(math.isfinite(m[k]) for k in ("loss", "nll", "margin", "grad_norm")), m
        assert m["nll"] > 0 and math.isclose(m["nll"], -m["reward_chosen"] / float(extra[0].split("=")[1]),
                                             rel_tol=1e-6), m
    assert metrics[1]["loss"] != metrics[3]["loss"] and "eval_loss" in metrics[0] and "eval_loss" in metrics[3]
    if loss_type == "orpo":  # per pair: NLL - beta log sigmoid(...) > NLL on average
        assert metrics[1]["loss"] > metrics[1]["nll"]


def test_the_no_reference_harness_catches_a_reference(tmp_path):
    """The same harness with sigmoid DPO fails: the test above would notice a reference being built."""
    res = _stage_run(tmp_path, "sigmoid")
    assert res.returncode != 0 and "reference model or reference log-probs were asked for" in res.stderr


# ----------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("sets, message", [
    (["dpo.loss_type=simpo", "dpo.reference=tiny:llama"],
     "dpo.reference is set but dpo.loss_type=simpo uses no reference model"),
    (["dpo.loss_type=orpo", "dpo.reference_logprobs=online"],
     "dpo.reference_logprobs=online but dpo.loss_type=orpo uses no reference model"),
    (["dpo.loss_type=ipo", "dpo.simpo_gamma=1.0"], "dpo.simpo_gamma applies to dpo.loss_type=simpo only, not "
                                                   "dpo.loss_type=ipo"),
    (["dpo.loss_type=orpo", "dpo.nll_weight=1.0"], "dpo.nll_weight applies to dpo.loss_type=simpo only, not "
                                                   "dpo.loss_type=orpo"),
    (["dpo.loss_type=orpo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing applies to loss_type 'sigmoid' or "
                                                        "'simpo' only, not dpo.loss_type=orpo"),
    (["dpo.loss_type=simpo", "dpo.simpo_gamma=-0.5"], "dpo.simpo_gamma: must be a finite number >= 0.0"),
    (["dpo.loss_type=kto"], "dpo.loss_type: must be one of sigmoid, ipo, simpo, orpo, got 'kto'"),
])
def test_bad_settings_are_exit_2_naming_the_keys(tmp_path, capsys, sets, message):
    cfg = tiny_config(tmp_path, run={"stage": "dpo", "dir": str(tmp_path / "run")})
    code, err = run_cli(capsys, "--config", str(cfg), *[a for s in sets for a in ("--set", s)])
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) <= 2, err


# ----------------------------------------------------------------------------------------------- megatron
@pytest.mark.distributed
def test_megatron_simpo_matches_hf_backend(tmp_path):
    """tests/parallel/test_dpo_megatron.py's check for simpo: tp2 on gloo gives the HF backend's per-step losses,
    stats, eval metrics and final weights on a fresh random tiny Llama; neither run builds a reference."""
    from nova_rt.models.tiny import save_tiny_model
    from tests.parallel.run_helpers import ROOT, clean_env, read_metrics, read_weights
    from tests.parallel.run_helpers import SEED as MODEL_SEED

    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=MODEL_SEED, hidden=64, layers=2, heads=4,
                                kv_heads=2, intermediate=128)
    common = ["--config", str(ROOT / "configs" / "tiny_dpo.yaml"), "--set", f"model.path={model_dir}",
              *[a for s in ("train.max_steps=2", "train.global_batch=2", "train.micro_batch=1", "train.eval_every=2",
                            "logging.tensorboard=false", "logging.plot=false", "checkpoint.every=0",
                            "optim.grad_clip=1.0", "train.num_threads=1", "dpo.loss_type=simpo", "dpo.beta=2.0",
                            "dpo.simpo_gamma=0.4", "dpo.nll_weight=0.3") for a in ("--set", s)]]
    hf = subprocess.run([sys.executable, "-m", "nova_rt.train", *common, "--set", f"run.dir={tmp_path / 'hf'}"],
                        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert hf.returncode == 0, hf.stderr[-4000:]
    mg = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                         str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), *common,
                         "--set", f"run.dir={tmp_path / 'mg'}", "--set", "parallel.backend=megatron",
                         "--set", "parallel.tensor_parallel=2"],
                        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert mg.returncode == 0, mg.stderr[-4000:]
    for run in ("hf", "mg"):
        assert not list((tmp_path / run).glob("ref_logps_*")), run
    mh, mm = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "mg")
    assert [m["step"] for m in mh] == [m["step"] for m in mm] == [0, 1, 2]
    keys = ["loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "nll", "logps_chosen", "logps_rejected",
            "pairs", "grad_norm", "eval_loss", "eval_reward_chosen", "eval_margin", "eval_accuracy"]
    for a, b in zip(mh, mm):
        for k in keys:
            if k in a:  # margins: beta x differences of mean log-probs; per-token fp32 noise ~1e-7 relative
                assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) + 1e-5, (f"seed={MODEL_SEED}", a["step"], k, a[k], b[k])
    assert mm[1]["loss"] != mm[2]["loss"]
    wh, wm = read_weights(tmp_path / "hf" / "final"), read_weights(tmp_path / "mg" / "final")
    for k in wh:
        rel = ((wh[k] - wm[k]).norm() / wh[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (f"seed={MODEL_SEED}", k, rel)
