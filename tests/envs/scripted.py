"""A rollout engine that plays scripted replies (the multi-turn driver's tests): `policy(prompt_text) -> reply`,
where a reply is text (encoded, then the EOS token appended: a finished turn) or a list of token ids (as given, no
EOS: an unfinished turn unless it ends with one). Log-probs are -0.5 per token; every call is recorded. GoOn: an
environment whose episodes last a set number of turns whatever the replies (the engine tests' transcripts)."""

from __future__ import annotations

from nova_rt.rollout.generate import Rollout


class ScriptedEngine:
    def __init__(self, tokenizer, policy, max_new_tokens: int = 160):
        self.tok, self.policy, self.max_new_tokens = tokenizer, policy, max_new_tokens
        self.calls: list[tuple[list[list[int]], list[list[int]]]] = []

    def generate(self, prompts: list[list[int]], group_size: int = 1, *, greedy: bool = False) -> Rollout:
        prompts = [prompt for prompt in prompts for _ in range(group_size)]
        eos = self.tok.eos_token_id
        responses = []
        for prompt in prompts:
            reply = self.policy(self.tok.decode(prompt))
            ids = reply if isinstance(reply, list) else self.tok(reply, add_special_tokens=False)["input_ids"] + [eos]
            responses.append(ids[:self.max_new_tokens])
        self.calls.append(([list(p) for p in prompts], responses))
        return Rollout(prompt_ids=prompts, response_ids=responses,
                       texts=self.tok.batch_decode(responses, skip_special_tokens=True),
                       finished=[bool(r) and r[-1] == eos for r in responses],
                       logprobs=[[-0.5] * len(r) for r in responses])


class GoOn:
    """Asks for another turn until the row's `turns` replies were given (reward 1 then); `filler` lengthens the
    opening message (vLLM's prefix cache holds whole blocks of 128 tokens on CPU)."""

    def __init__(self, example: dict, filler: int = 0):
        self.turns, self.replies, self.filler = example["turns"], 0, filler

    def reset(self) -> list[dict]:
        return [{"role": "user", "content": f"Talk to me {self.turns} times." + " Please." * self.filler}]

    def step(self, reply: str) -> tuple[list[dict], float, bool]:
        self.replies += 1
        done = self.replies >= self.turns
        return ([] if done else [{"role": "user", "content": "Go on."}]), float(done), done
