"""A rollout engine that plays scripted replies (the multi-turn driver's tests): `policy(prompt_text) -> reply`,
where a reply is text (encoded, then the EOS token appended: a finished turn) or a list of token ids (as given, no
EOS: an unfinished turn unless it ends with one). Log-probs are -0.5 per token; every call is recorded."""

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
