"""The `guess_number` environment: a multi-turn game with feedback. The model guesses a whole number between `low`
and `high` (params, default 1 and 100); each wrong guess is answered "Higher." or "Lower.", a reply without a number
is asked again, and the right guess ends the episode with reward 1.0 (the episode reaching grpo.env.max_turns first
earns 0). The number is the data row's `target` or, for RL prompt rows (which keep only their `answer`), `answer`.
"""

from __future__ import annotations

import re

from nova_rt.envs import register_env
from nova_rt.envs.calculator import opening_messages

_INTEGER_RE = re.compile(r"-?\d+")


@register_env("guess_number")
class GuessNumberEnv:
    def __init__(self, example: dict, low: int = 1, high: int = 100):
        target = example.get("target", example.get("answer"))
        try:
            self.target = int(str(target).strip())
        except ValueError:
            raise ValueError(f"the data row needs a whole-number 'target' (or 'answer'), got {target!r}") from None
        if not low <= self.target <= high:
            raise ValueError(f"target {self.target} is outside [{low}, {high}] (grpo.env.params low/high)")
        self.example, self.low, self.high = example, low, high

    def reset(self) -> list[dict]:
        rules = (f"I am thinking of a whole number between {self.low} and {self.high}. Guess it: reply with one "
                 "number. After each wrong guess I say Higher. or Lower.")
        if "messages" in self.example or "prompt" in self.example:
            return opening_messages(self.example, rules)
        return [{"role": "user", "content": rules}]

    def step(self, reply: str) -> tuple[list[dict], float, bool]:
        found = _INTEGER_RE.findall(reply)
        if not found:
            return [{"role": "user", "content": f"Reply with one whole number between {self.low} and {self.high}."}], \
                0.0, False
        guess = int(found[-1])
        if guess == self.target:
            return [{"role": "user", "content": "Correct!"}], 1.0, True
        return [{"role": "user", "content": "Higher." if guess < self.target else "Lower."}], 0.0, False
