"""grpo.loss.mode end to end: every mode trains the tiny GRPO config on the hf backend (two steps, finite loss and
gradient norm, and the policy moves away from the reference: KL > 0 at step 2, where step 1's KL is exactly 0),
each beside a different neighbour (KL in the reward or the loss, top-k or sampled KL, the PTX term, an advantage
estimator); gmpo with an aggregation it does not have and an unknown mode are exit 2 naming the keys."""

import json
import math

import pytest

from tests.reliability_helpers import ROOT, run_cli

# mode -> the other grpo.loss keys (and grpo.ptx.coef) of its run
RUNS = {
    "gspo": dict(agg="seq-mean-token-mean", eps_low=0.003, eps_high=0.004, kl="topk", kl_placement="reward"),
    "gspo_token": dict(agg="token-mean", kl="k3", kl_placement="loss"),
    "cispo": dict(agg="token-mean", eps_low=1.0, eps_high=4.0, kl="topk", kl_placement="loss"),
    "sapo": dict(agg="seq-mean-token-mean", sapo_tau=[1.0, 1.05], kl="k2", kl_placement="reward", ptx=0.1),
    "gmpo": dict(agg="seq-mean-token-mean", eps_low=0.4, eps_high=0.4, kl="topk", kl_placement="reward",
                 advantage="rloo"),
}


def _grpo_config(tmp_path, ptx: float = 0.0, **loss) -> str:
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps({
        "include": str(ROOT / "configs" / "tiny_grpo.yaml"), "run": {"dir": str(tmp_path / "run")},
        "train": {"max_steps": 2, "num_threads": 1}, "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "plot": False},
        "grpo": {"sampling": {"group_size": 3, "prompts_per_step": 4, "max_new_tokens": 6}, "micro_prompts": 2,
                 "loss": {"beta": 0.05, **loss}, "ptx": {"coef": ptx}, "eval": {"every": 0}}}))
    return str(config)


@pytest.mark.parametrize("mode", sorted(RUNS))
def test_mode_trains_the_tiny_grpo_config(tmp_path, capsys, mode):
    code, err = run_cli(capsys, "--config", _grpo_config(tmp_path, mode=mode, **RUNS[mode]))
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in rows), rows
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0, f"the policy did not move: {rows}"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_gmpo_with_token_mean_is_exit_2_naming_both_keys(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", _grpo_config(tmp_path, mode="gmpo", agg="token-mean"))
    assert code == 2, err[-2000:]
    line = next(line for line in err.splitlines() if "config error" in line)
    assert "grpo.loss.mode=gmpo is defined for grpo.loss.agg=seq-mean-token-mean only" in line, line
    assert line.endswith("got grpo.loss.agg=token-mean"), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_mode_is_exit_2_listing_choices(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", _grpo_config(tmp_path, mode="ppo"))
    assert code == 2, err[-2000:]
    line = next(line for line in err.splitlines() if "config error" in line)
    assert line.endswith("grpo.loss.mode: must be one of ppo_clip, gspo, gspo_token, cispo, sapo, gmpo, got 'ppo'"), \
        line
