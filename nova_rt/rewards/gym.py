"""reasoning-gym scorers as a reward: each procedural task scores answers with its own `score_answer`.

Samples made by nova_rt.data.rl from a reasoning-gym task carry sample["gym"] = {"dataset": name, "entry": entry}.
The scorer is the dataset class's method (reasoning_gym.get_score_answer_fn), cached per task name. reasoning-gym's
scorers compare a bare answer string, so by default the final answer is first extracted from the response with the
math verifier's rules (`extract: true`); `extract: false` passes the stripped response unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from nova_rt.rewards import register_reward
from nova_rt.rewards.math import extract_answer

_SCORERS: dict[str, Callable] = {}


def gym_scorer(name: str) -> Callable:
    if name not in _SCORERS:
        import reasoning_gym

        _SCORERS[name] = reasoning_gym.get_score_answer_fn(name)
    return _SCORERS[name]


@register_reward("reasoning_gym")
def reasoning_gym_reward(extract: bool = True):
    def score(completions: list[str], samples: list[dict]) -> list[float]:
        out = []
        for i, (text, sample) in enumerate(zip(completions, samples)):
            gym = sample.get("gym")
            if not gym:
                raise ValueError(f"sample {i} (category {sample.get('category')!r}) is not a reasoning-gym task "
                                 "(no 'gym' record); use the math verifier for file prompts")
            answer = extract_answer(text) if extract else text.strip()
            out.append(float(gym_scorer(gym["dataset"])(answer, gym["entry"])))
        return out

    return score
