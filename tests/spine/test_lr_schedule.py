"""The lr schedule (nova_rt/lr_schedule.py) is written once: its values are pinned here, bit for bit, for every
scheduler kind with and without warmup and min_lr_ratio, and the three loops that apply it (the HF Trainer's
LambdaLR, run_megatron_steps of the supervised megatron stages, GRPO's MegatronPolicy) set exactly those lrs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from nova_rt.config import build_config
from nova_rt.distributed import DistInfo
from nova_rt.lr_schedule import lr_at, lr_lambda, lr_schedule
from nova_rt.telemetry import Telemetry

TOTAL = 8  # train.max_steps; steps 0..9 include the two after the end (held at the floor)
# (scheduler, warmup_steps, min_lr_ratio) -> the multiplier of optim.lr at optimizer steps 0..9, as the code computed
# it before the schedule moved into one module (trainer.py's lr_lambda at 5e1638a), repr'd floats
PINNED = {
    ("cosine", 0, 0.0): [1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449, 0.5, 0.30865828381745514,
                         0.14644660940672627, 0.03806023374435663, 0.0, 0.0],
    ("cosine", 0, 0.1): [1.0, 0.9657457896300791, 0.8681980515339464, 0.7222075445642904, 0.55, 0.3777924554357096,
                         0.23180194846605365, 0.13425421036992097, 0.1, 0.1],
    ("cosine", 3, 0.0): [0.3333333333333333, 0.6666666666666666, 1.0, 1.0, 0.9045084971874737, 0.6545084971874737,
                         0.34549150281252633, 0.09549150281252633, 0.0, 0.0],
    ("cosine", 3, 0.1): [0.3333333333333333, 0.6666666666666666, 1.0, 1.0, 0.9140576474687263, 0.6890576474687263,
                         0.41094235253127376, 0.18594235253127372, 0.1, 0.1],
    ("linear", 0, 0.0): [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0],
    ("linear", 0, 0.1): [1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.21250000000000002, 0.1, 0.1],
    ("linear", 3, 0.0): [0.3333333333333333, 0.6666666666666666, 1.0, 1.0, 0.8, 0.6, 0.4, 0.19999999999999996, 0.0,
                         0.0],
    ("linear", 3, 0.1): [0.3333333333333333, 0.6666666666666666, 1.0, 1.0, 0.8200000000000001, 0.64,
                         0.4600000000000001, 0.27999999999999997, 0.1, 0.1],
    ("constant", 0, 0.1): [1.0] * 10,
    ("constant", 3, 0.1): [0.3333333333333333, 0.6666666666666666] + [1.0] * 8,
}
LR = 3e-4
CASES = sorted(PINNED)
IDS = [f"{k}-w{w}-min{m}" for k, w, m in CASES]


class _Backend:
    """What the megatron loops drive of MegatronTrainer: set_lr, and a finite step that applies the update."""

    update_skipped = False

    def __init__(self):
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.0}])

    def set_lr(self, lr: float) -> None:
        self.optimizer.param_groups[0]["lr"] = lr

    def train_step(self, micro_batches, loss_fn=None, **kwargs) -> dict:
        return {"loss": 1.0, "grad_norm": 1.0, "tokens": 4}


def _cfg(kind: str, warmup: int, min_ratio: float, max_steps: int = TOTAL, **extra):
    return build_config({"optim": {"lr": LR, "scheduler": kind, "warmup_steps": warmup, "min_lr_ratio": min_ratio},
                         "train": {"max_steps": max_steps, "max_nonfinite_steps": 3},
                         "checkpoint": {"every": 0, "keep_last": 0, **extra}})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_schedule_values_are_pinned(case):
    kind, warmup, min_ratio = case
    o = _cfg(*case).optim
    assert [lr_lambda(s, warmup=warmup, total=TOTAL, kind=kind, min_ratio=min_ratio) for s in range(10)] \
        == PINNED[case]
    assert [lr_schedule(o, TOTAL)(s) for s in range(10)] == PINNED[case]
    assert [lr_at(o, TOTAL, s) for s in range(10)] == [LR * f for f in PINNED[case]]  # o.lr * multiplier, bit-exact


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hf_trainer_applies_the_schedule(tmp_path, case):
    from nova_rt.trainer import Trainer

    torch.manual_seed(0)
    tr = Trainer(_cfg(*case), DistInfo(), torch.nn.Linear(3, 1), run_dir=tmp_path)
    loss = lambda model, mb: (model(mb["x"]).square().sum(), {})  # noqa: E731
    lrs = [tr.train_step([{"x": torch.ones(2, 3)}], loss)["lr"] for _ in range(TOTAL)]
    assert lrs == [LR * f for f in PINNED[case][:TOTAL]]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_megatron_step_loop_applies_the_schedule(tmp_path, case):
    from tests.megatron_steps import run_megatron_steps

    tel = Telemetry(tmp_path, enabled=True, tensorboard=False, progress_bar=False)
    try:
        run_megatron_steps(_cfg(*case, save_final=False), _Backend(), tel, tmp_path, 0, lambda step: [])
    finally:
        tel.close(plot=False)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [LR * f for f in PINNED[case][:TOTAL]]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grpo_megatron_policy_applies_the_schedule(tmp_path, case):
    from nova_rt.backends.megatron import MegatronPolicy

    policy = MegatronPolicy(_cfg(*case), _Backend(), tmp_path, 1.0)
    assert [policy.train_step([], None)["lr"] for _ in range(TOTAL)] == [LR * f for f in PINNED[case][:TOTAL]]


def test_warmup_and_floor_shape():
    """What the pinned numbers say, in words: warmup rises linearly to the peak at step warmup-1 (held one more step,
    where the decay starts at progress 0), the decay ends at min_lr_ratio at train.max_steps and stays there."""
    f = PINNED[("cosine", 3, 0.1)]
    assert f[:4] == [1 / 3, 2 / 3, 1.0, 1.0] and f[-2:] == [0.1, 0.1]
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert math.isclose(PINNED[("cosine", 0, 0.0)][4], 0.5)
