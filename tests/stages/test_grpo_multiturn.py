"""Multi-turn episodes (grpo.env) in the GRPO stage.

  * The loss mask: groups whose responses interleave sampled tokens with environment tokens (RolloutGroup.
    response_masks) give a stage loss and gradients equal to an independent fp64 formula that runs the HF model on
    each whole prompt+trajectory unpacked and keeps only the sampled positions: the group advantage, the clipped
    surrogate, the k3 KL in the loss or its return-to-go over the sampled tokens in the reward, and every
    aggregation counted over sampled tokens (a response with no sampled token is empty); with and without the
    shared-prefix layout and micro-batches.
  * The whole loop on a tiny model: guess_number (feedback turns) and calculator episodes train, evaluate greedy
    episodes and report the episode metrics; a killed run resumes to the same weights; a user environment that fails
    some episodes is counted (env_error_frac) and one that fails too many stops the run with exit 2 naming it;
    grpo.env.add_rewards adds grpo.rewards on the final reply to the turn rewards exactly once; config
    combinations that cannot run are exit 2 naming the keys.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nova_rt.stages.grpo import GRPOConfig, GRPODataConfig, GRPOLossConfig, PolicyLogprobs, RolloutGroup, SamplingConfig
from tests.helpers import assert_close_verbose
from tests.reliability_helpers import run_cli
from tests.stages.grpo_loss_fns import make_loss_fn
from tests.stages.test_grpo import V, _fake_run, _model, _seed, _unpacked

ROOT = Path(__file__).resolve().parents[2]


def _masked_groups(gen, n_groups: int, group_size: int) -> list[RolloutGroup]:
    groups = []
    for index in range(n_groups):
        prompt = torch.randint(0, V, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        responses, masks = [], []
        for member in range(group_size):
            length = int(torch.randint(1, 10, (1,), generator=gen))
            responses.append(torch.randint(0, V, (length,), generator=gen).tolist())
            mask = (torch.rand(length, generator=gen) < 0.6).tolist()
            if index == 0 and member == 0:
                mask = [False] * length  # an episode whose only tokens are context: empty for the loss
            masks.append(mask)
        rewards = torch.randn(group_size, generator=gen).tolist()
        groups.append(RolloutGroup(prompt, responses, rewards, response_masks=masks))
    return groups


def masked_oracle(g: GRPOConfig, groups, pol, ref, old_pol) -> torch.Tensor:
    """The objective over sampled tokens only (fp64, unpacked forwards of each whole prompt+response)."""
    per_response = []
    for group in groups:
        for response, mask in zip(group.responses, group.response_masks):
            ids, n = group.prompt + response, len(response)
            keep = torch.tensor(mask, dtype=torch.bool)
            target = torch.tensor(response)[:, None]
            lp, old, lref = (_unpacked(model, ids, g.sampling.temperature)[-n:].gather(1, target)[:, 0][keep]
                             for model in (pol, old_pol, ref))
            per_response.append((lp, old.detach(), lref.detach()))
    lengths = [int(sum(mask)) for group in groups for mask in group.response_masks]
    tokens, responses, nonempty, longest = sum(lengths), len(lengths), sum(x > 0 for x in lengths), max(lengths)
    loss, i = 0.0, 0
    for group in groups:
        rewards = torch.tensor(group.rewards, dtype=torch.float64)
        deviation = rewards - rewards.mean()
        advantages = deviation / ((deviation.square().sum() / (len(rewards) - 1)).sqrt() + 1e-4)
        for advantage in advantages:
            lp, old, lref = per_response[i]
            count = lp.shape[0]
            if count:
                weight = {"token-mean": 1 / tokens, "seq-mean-token-mean": 1 / (nonempty * count),
                          "seq-mean-token-sum-norm": 1 / (responses * longest)}[g.loss.agg]
                a = advantage.expand(count).clone()
                d_old = lref - old
                if g.loss.kl_placement == "reward":
                    kl_old = (d_old.exp() - d_old - 1).clamp(max=10)
                    a = a - g.loss.beta * torch.flip(torch.cumsum(torch.flip(kl_old, [0]), 0), [0])
                ratio = torch.exp(lp - old)
                term = torch.maximum(-a * ratio, -a * ratio.clamp(1 - g.loss.eps_low, 1 + g.loss.eps_high))
                if g.loss.kl_placement == "loss":
                    d = lref - lp
                    term = term + g.loss.beta * (d.exp() - d - 1).clamp(max=10)
                loss = loss + weight * term.sum()
            i += 1
    return loss


CASES = [  # (placement, agg, ppo_epochs, micro_prompts, shared-prefix layout)
    ("loss", "token-mean", 1, 0, True),
    ("reward", "seq-mean-token-mean", 2, 1, False),
    ("loss", "seq-mean-token-sum-norm", 2, 2, True),
    ("reward", "token-mean", 1, 1, True),
]


@pytest.mark.parametrize("placement, agg, ppo_epochs, micro, shared", CASES)
def test_only_sampled_tokens_carry_loss(placement, agg, ppo_epochs, micro, shared):
    seed = _seed()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g = GRPOConfig(sampling=SamplingConfig(group_size=3, temperature=0.8),
                   data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                   loss=GRPOLossConfig(kl="k3", kl_placement=placement, agg=agg, beta=0.2, eps_low=0.2,
                                       eps_high=0.28),
                   ppo_epochs=ppo_epochs, micro_prompts=micro)
    pol_hf, ref_hf, old_hf = _model(seed % 1000), _model(seed % 1000 + 1), _model(seed % 1000)
    policy, ref = PolicyLogprobs(pol_hf), PolicyLogprobs(ref_hf)
    groups = _masked_groups(gen, 4, 3)
    mbs = _fake_run(g, policy, ref, shared=shared).micro_batches(groups)
    sampled = sum(sum(mask) for group in groups for mask in group.response_masks)
    assert sum(int(mb.response_cu_seqlens[-1]) for mb in mbs) == sampled
    if ppo_epochs > 1:
        with torch.no_grad():
            for p in pol_hf.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    got = sum(make_loss_fn(g, g.sampling.temperature)(policy, mb)[0] for mb in mbs)
    got.backward()
    pol_ref_hf = _model(seed % 1000)
    pol_ref_hf.load_state_dict(pol_hf.state_dict())
    expect = masked_oracle(g, groups, pol_ref_hf, ref_hf, old_hf)
    expect.backward()
    msg = f"seed {seed} case {placement, agg, ppo_epochs, micro, shared}"
    assert_close_verbose(got.detach().reshape(1), expect.detach().reshape(1), rtol=2e-5, atol=1e-7, name=msg)
    for (name, p), p_ref in zip(pol_hf.named_parameters(), pol_ref_hf.parameters()):
        assert_close_verbose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7, name=f"d {name} {msg}")


# ----------------------------------------------------------------------------------------------- the whole loop
FAULTY_ENV = '''
class Faulty:
    """Fails step() on every episode whose row id ends in an odd digit (or on all with params every: true)."""
    def __init__(self, example, every=False):
        self.fail = every or int(example["id"].rsplit(":", 1)[1]) % 2 == 1
    def reset(self):
        return [{"role": "user", "content": "Say something."}]
    def step(self, reply):
        if self.fail:
            raise RuntimeError("the simulator crashed")
        return [], float(len(reply) % 2), True
'''


TWO_TURNS = '''
class TwoTurns:
    """Two turns whatever the reply; turn rewards 0.125 and 0.25."""
    def __init__(self, example):
        self.turn = 0
    def reset(self):
        return [{"role": "user", "content": "Say two things."}]
    def step(self, reply):
        self.turn += 1
        return [{"role": "user", "content": "And?"}], 0.125 * self.turn, self.turn == 2

def half(completions, samples):
    assert len(completions) == len(samples) and all("id" in sample for sample in samples)
    return [0.5] * len(completions)
'''


def _config(tmp_path: Path, env: dict, task: str = "guess", **grpo) -> Path:
    files = {"prompt_files": [str(ROOT / "data" / "multiturn" / f"{task}_train.jsonl")],
             "eval_files": [str(ROOT / "data" / "multiturn" / f"{task}_eval.jsonl")]}
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps({
        "include": str(ROOT / "configs" / "tiny_grpo.yaml"), "run": {"dir": str(tmp_path / "run")},
        "train": {"max_steps": 2, "num_threads": 1}, "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "plot": False},
        "grpo": {"sampling": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6}, "micro_prompts": 1,
                 "data": {"gym_tasks": [], "system_prompt": "", **files}, "loss": {"beta": 0.05, "kl": "k3"},
                 "ptx": {"coef": 0.0}, "eval": {"every": 2, "batch": 8},
                 "env": {"max_turns": 3, "max_new_tokens_per_turn": 6, "max_total_tokens": 1600, **env}, **grpo}}))
    return config


def _rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_guess_number_episodes_train_and_evaluate(tmp_path, capsys):
    config = _config(tmp_path, {"type": "guess_number", "params": {"low": 1, "high": 16}})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 0, err[-3000:]
    rows = _rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert 1.0 <= row["turns_mean"] <= 3.0 and row["env_error_frac"] == 0.0 and row["response_len"] <= 18
        assert {"tool_calls_mean", "tool_error_frac", "env_time_s", "episode_truncated_frac", "accuracy"} <= set(row)
    assert any(row["turns_mean"] > 1.0 for row in rows), rows  # wrong guesses get feedback and another turn
    final = json.loads((tmp_path / "run" / "eval_final.json").read_text())
    assert final["eval_n"] == 50.0 and len(final["correct"]["guess"]) == 50


def test_calculator_episode_trains(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", str(_config(tmp_path, {"type": "calculator"}, task="calculator")))
    assert code == 0, err[-3000:]
    assert all(row["turns_mean"] >= 1.0 for row in _rows(tmp_path))


def test_failing_environment_is_counted_then_stops_the_run(tmp_path, capsys):
    (tmp_path / "faulty_env.py").write_text(FAULTY_ENV)
    env = {"type": "user", "path": str(tmp_path / "faulty_env.py") + ":Faulty", "max_error_frac": 1.0}
    code, err = run_cli(capsys, "--config", str(_config(tmp_path, env, eval={"every": 0})))
    assert code == 0, err[-3000:]
    assert any(row["env_error_frac"] > 0 for row in _rows(tmp_path))
    env.update(max_error_frac=0.5, params={"every": True})
    (tmp_path / "run2").mkdir()
    config = _config(tmp_path / "run2", env, eval={"every": 0})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 2, err[-3000:]
    line = next(line for line in err.splitlines() if "episodes of this step failed" in line)
    assert "grpo.env.max_error_frac=0.5" in line and "RuntimeError: the simulator crashed" in line, line


def test_add_rewards_adds_the_reward_functions_once(tmp_path, capsys):
    """Episode reward = its turn rewards (0.125 + 0.25) + grpo.rewards on the final reply (0.5) with add_rewards,
    the turn rewards alone without: 0.875 / 0.375 (0.375 or 1.375 if the functions were left out or added twice)."""
    (tmp_path / "two_turns.py").write_text(TWO_TURNS)
    path = str(tmp_path / "two_turns.py")
    for add, expect in ((True, 0.875), (False, 0.375)):
        run_dir = tmp_path / str(add)
        run_dir.mkdir()
        config = _config(run_dir, {"type": "user", "path": path + ":TwoTurns", "add_rewards": add},
                         eval={"every": 0}, rewards=[{"type": "user", "function": path + ":half"}])
        code, err = run_cli(capsys, "--config", str(config), "--set", "train.max_steps=1")
        assert code == 0, err[-3000:]
        (row,) = _rows(run_dir)
        assert row["turns_mean"] == 2.0 and row["reward_mean"] == expect and row["reward_std"] == 0.0, row


def test_combinations_that_cannot_run_are_exit_2(tmp_path, capsys):
    from nova_rt.envs import EnvConfig
    from nova_rt.rollout.base import RolloutConfig

    extra = {"data": {"gym_tasks": [{"name": "basic_arithmetic", "prefill": "x ="}], "prompt_files": [],
                      "eval_files": []}}
    code, err = run_cli(capsys, "--config", str(_config(tmp_path, {"type": "guess_number"}, **extra)))
    assert code == 2 and "grpo.data.gym_tasks entries must not set prefill" in err, err[-2000:]
    config = GRPOConfig(data=GRPODataConfig(gym_tasks=[{"name": "x"}]),
                        rollout=RolloutConfig(engine="vllm", max_model_len=1024),
                        env=EnvConfig(type="guess_number"))  # the CLI names the missing vllm package first here
    with pytest.raises(ValueError, match="grpo.env.max_total_tokens=2048 exceeds grpo.rollout.max_model_len=1024"):
        config.validate()
    config.env.max_total_tokens = 1024
    config.validate()


def test_killed_multiturn_run_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    def train(run_dir: Path) -> subprocess.Popen:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = _config(run_dir, {"type": "guess_number", "params": {"low": 1, "high": 16}},
                         eval={"every": 0})
        cmd = [sys.executable, "-m", "nova_rt.train", "--config", str(config), "--set", "train.max_steps=4",
               "--set", "checkpoint.every=2"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})

    full, killed = train(tmp_path / "full"), train(tmp_path / "killed")
    checkpoint = tmp_path / "killed" / "run" / "checkpoints" / "step_00000002" / "manifest.json"
    start = time.time()
    while not checkpoint.exists() and killed.poll() is None and time.time() - start < 600:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed after its checkpoint"
    resumed = train(tmp_path / "killed")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resumed from" in out, out[-3000:]
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    a, b = (_rows(tmp_path / name) for name in ("full", "killed"))
    assert [row["step"] for row in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        for key in ("reward_mean", "response_len", "turns_mean", "loss"):
            assert row_a[key] == row_b[key], (row_a["step"], key, row_a[key], row_b[key])
    weights_a = load_file(tmp_path / "full" / "run" / "final" / "model.safetensors")
    weights_b = load_file(tmp_path / "killed" / "run" / "final" / "model.safetensors")
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
