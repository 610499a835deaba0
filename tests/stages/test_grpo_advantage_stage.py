"""grpo.loss.advantage through the GRPO stage: GRPORun.with_advantages -> micro_batches -> the stage loss equals the
independent objective of tests/stages/test_grpo.py (fp64, unpacked HF forwards) with the advantages of the fp64
references of tests/stages/test_grpo_advantages.py, values and gradients; a step whose advantages are all zero is
counted, logged and reported as zero_adv_frac; the estimators run end to end in the tiny GRPO config (hf backend)
and an unknown one is exit 2 listing the choices."""

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch

from nova_rt.stages.grpo import GRPOConfig, GRPODataConfig, GRPOLossConfig, SamplingConfig
from nova_rt.stages.grpo.batches import PolicyLogprobs, RolloutGroup
from tests.helpers import assert_close_verbose
from tests.reliability_helpers import ROOT, run_cli
from tests.stages.grpo_loss_fns import make_loss_fn
from tests.stages.test_grpo import _fake_run, _groups, _model, _seed, oracle_loss
from tests.stages.test_grpo_advantages import _reference

CASES = [  # (estimator, kl, placement, agg, beta, ppo_epochs, micro_prompts)
    ("rloo", "k3", "loss", "token-mean", 0.1, 1, 0),
    ("rloo", "topk", "reward", "seq-mean-token-mean", 0.3, 2, 1),
    ("reinforce_pp", "k3", "reward", "token-mean", 0.2, 1, 2),
    ("reinforce_pp", "topk", "loss", "seq-mean-token-sum-norm", 0.0, 2, 0),
    ("reinforce_pp_baseline", "k3", "loss", "seq-mean-token-mean", 0.1, 2, 1),
    ("reinforce_pp_baseline", "topk", "reward", "token-mean", 0.3, 1, 0),
]


def _prepare(run, groups):
    run.dp_sum, run.zero_advantage_steps = (lambda values: values), 0
    return run.with_advantages(groups, 0)


@pytest.mark.parametrize("estimator, kl, placement, agg, beta, ppo_epochs, micro", CASES)
def test_stage_loss_with_estimator_equals_independent_formula(estimator, kl, placement, agg, beta, ppo_epochs,
                                                              micro):
    seed = _seed()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    group_size = 3
    g = GRPOConfig(sampling=SamplingConfig(group_size=group_size), data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                   loss=GRPOLossConfig(kl=kl, kl_placement=placement, agg=agg, beta=beta, topk=20, eps_low=0.2,
                                       eps_high=0.28, advantage=estimator),
                   ppo_epochs=ppo_epochs, micro_prompts=micro)
    pol_hf, ref_hf, old_hf = _model(seed % 1000), _model(seed % 1000 + 1), _model(seed % 1000)
    policy, ref = PolicyLogprobs(pol_hf), PolicyLogprobs(ref_hf)
    groups = _groups(gen, 4, group_size)
    run = _fake_run(g, policy, ref)
    with_adv, metrics = _prepare(run, groups)
    lengths = [[len(response) for response in group.responses] for group in groups]
    expected_adv = _reference(estimator, [group.rewards for group in groups], lengths, "std")
    assert metrics["zero_adv_frac"] == sum(a == 0 for group in expected_adv for a in group) / 12
    mbs = run.micro_batches(with_adv)
    assert all(mb.advantages is not None for mb in mbs)
    if ppo_epochs > 1:
        with torch.no_grad():
            for p in pol_hf.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    loss_fn = make_loss_fn(g, g.sampling.temperature)
    got = sum(loss_fn(policy, mb)[0] for mb in mbs)
    got.backward()
    pol_ref_hf = _model(seed % 1000)
    pol_ref_hf.load_state_dict(pol_hf.state_dict())
    expect = oracle_loss(g, groups, pol_ref_hf, ref_hf, old_hf, advantages=expected_adv)
    expect.backward()
    msg = f"seed {seed} case {estimator, kl, placement, agg, beta, ppo_epochs, micro}"
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1), rtol=2e-5, atol=1e-7, name=msg)
    for (name, p), p_ref in zip(pol_hf.named_parameters(), pol_ref_hf.parameters()):
        assert_close_verbose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7, name=f"d {name} {msg}")


def test_group_estimator_leaves_advantages_to_the_kernel():
    g = GRPOConfig(data=GRPODataConfig(gym_tasks=[{"name": "x"}]))
    run = _fake_run(g, PolicyLogprobs(_model(1)), None)
    groups, metrics = _prepare(run, _groups(torch.Generator().manual_seed(0), 3, 3))
    assert all(group.advantages is None for group in groups)
    assert all(mb.advantages is None for mb in run.micro_batches(groups))
    assert metrics["zero_adv_frac"] == pytest.approx(3 / 9)  # _groups makes the first group's rewards equal


@pytest.mark.parametrize("estimator", ["group", "rloo", "reinforce_pp_baseline"])
def test_all_zero_step_is_counted_and_logged(estimator, caplog):
    g = GRPOConfig(data=GRPODataConfig(gym_tasks=[{"name": "x"}]), loss=GRPOLossConfig(advantage=estimator))
    run = _fake_run(g, PolicyLogprobs(_model(1)), None)
    rng = random.Random(0)
    groups = [RolloutGroup([1, 2], [[3] * rng.randint(1, 4) for _ in range(3)], [float(j % 2)] * 3)
              for j in range(4)]
    run.dp_sum, run.zero_advantage_steps = (lambda values: values), 0
    with caplog.at_level(logging.WARNING, logger="nova_rt.grpo"):
        _, metrics = run.with_advantages(groups, 7)
        _, _ = run.with_advantages(groups, 8)
    assert metrics["zero_adv_frac"] == 1.0 and run.zero_advantage_steps == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2 and "rollout step 7: every advantage is 0" in warnings[0], warnings
    assert f"grpo.loss.advantage={estimator}" in warnings[0] and "2 such step(s)" in warnings[1]


def _grpo_config(tmp_path, **loss) -> Path:
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps({
        "include": str(ROOT / "configs" / "tiny_grpo.yaml"), "run": {"dir": str(tmp_path / "run")},
        "train": {"max_steps": 2, "num_threads": 1}, "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "plot": False},
        "grpo": {"sampling": {"group_size": 3, "prompts_per_step": 4, "max_new_tokens": 6}, "micro_prompts": 2,
                 "loss": {"beta": 0.05, **loss}, "ptx": {"coef": 0.0}, "eval": {"every": 0}}}))
    return config


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_estimator_trains_the_tiny_grpo_config(tmp_path, capsys, estimator):
    code, err = run_cli(capsys, "--config", str(_grpo_config(tmp_path, advantage=estimator)))
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(0.0 <= row["zero_adv_frac"] <= 1.0 and math.isfinite(row["loss"]) for row in rows)


def test_unknown_estimator_is_exit_2_listing_choices(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", str(_grpo_config(tmp_path, advantage="gae")))
    assert code == 2, err[-2000:]
    line = next(line for line in err.splitlines() if "config error" in line)
    assert line.endswith("grpo.loss.advantage: must be one of group, rloo, reinforce_pp, reinforce_pp_baseline, got "
                         "'gae'"), line
