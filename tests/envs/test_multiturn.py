"""The multi-turn rollout driver: scripted calculator and guess_number episodes, token-in-token-out trajectories
(sampled ids kept even where re-tokenizing their text differs; environment ids exactly the chat template's), the
sampled-token mask, engine log-probs against a teacher-forced forward, truncation, and environment faults."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from nova_rt.envs import EnvConfig, EnvError, build_env_factory
from nova_rt.errors import ConfigError
from nova_rt.models.tiny import byte_tokenizer
from nova_rt.rollout.engine import HFEngine
from nova_rt.rollout.multiturn import MultiTurnDriver, check_env_errors, trajectory_logprobs
from tests.envs.scripted import ScriptedEngine


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def calculator_policy(prompt: str) -> str:
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>|<\|im_start\|>tool\n(.*?)<\|im_end\|>", prompt)
    results = [a or b for a, b in results]
    if results:
        return f"The answer is {results[-1]}."
    question = re.findall(r"What is (.*?)\?", prompt)[-1]
    return f'<tool_call>{{"name": "calculate", "arguments": {{"expression": "{question}"}}}}</tool_call>'


def binary_search_policy(prompt: str) -> str:
    low, high = 1, 100
    for guess, feedback in re.findall(r"assistant\n(\d+)<\|im_end\|>\n<\|im_start\|>user\n(\w+)", prompt):
        low, high = (int(guess) + 1, high) if feedback == "Higher" else (low, int(guess) - 1)
    return str((low + high) // 2)


def driver(tok, engine, env_type: str = "calculator", factory=None, **fields) -> MultiTurnDriver:
    cfg = EnvConfig(type=env_type, max_new_tokens_per_turn=engine.max_new_tokens, **fields)
    return MultiTurnDriver(engine, tok, factory or build_env_factory(cfg), cfg)


def test_calculator_scripted_episode_and_template_ids(tool_tokenizer):
    tok = tool_tokenizer
    engine = ScriptedEngine(tok, calculator_policy)
    out = driver(tok, engine).run([{"prompt": "What is 51 - 7 * 3?", "answer": "30"},
                                   {"prompt": "What is 2 + 2?", "answer": "5"}], 2)
    rewards = [t.reward for t in out.trajectories]
    assert rewards == [1.0, 1.0, 0.0, 0.0]  # a row's G episodes adjacent; 4 is not the reference 5
    for trajectory in out.trajectories:
        summary = (trajectory.turns, trajectory.tool_calls, trajectory.tool_errors, trajectory.truncated)
        assert summary == (2, 1, 0, False)
        assert [m["role"] for m in trajectory.messages] == ["system", "user", "assistant", "tool", "assistant"]
    first = out.trajectories[0]
    assert first.messages[3]["content"] == "30" and first.final_reply == "The answer is 30."
    # every non-sampled id is the template's: the trajectory is the rendering of the whole conversation (less the
    # template's newline after the last EOS), since the scripted sampled ids equal their text's encoding
    rendered = tok.apply_chat_template(first.messages, tools=[_calculate_schema()], tokenize=False)
    assert first.token_ids + encode(tok, "\n") == encode(tok, rendered)
    replies = [ids for _, responses in engine.calls for ids in responses[:1]]
    assert [i for i, m in zip(first.token_ids, first.sampled_mask) if m] == replies[0] + replies[1]
    assert first.logprobs == [-0.5] * sum(first.sampled_mask)
    assert out.metrics["turns_mean"] == 2.0 and out.metrics["tool_calls_mean"] == 1.0
    assert out.metrics["tool_error_frac"] == 0.0 and out.metrics["episode_truncated_frac"] == 0.0


def _calculate_schema() -> dict:
    from nova_rt.envs.calculator import calculate
    from nova_rt.envs.tools import make_tool

    return make_tool(calculate).schema


def test_tool_errors_reach_the_model_and_are_counted(tool_tokenizer):
    replies = iter(['<tool_call>{"name": "calculate", "arguments": {"expression": "1 +"}}</tool_call>',
                    '<tool_call>{"name": "sqrt", "arguments": {}}</tool_call><tool_call>{oops</tool_call>',
                    "The answer is 3."])
    out = driver(tool_tokenizer, ScriptedEngine(tool_tokenizer, lambda prompt: next(replies)), max_turns=5).run(
        [{"prompt": "What is 1 + 2?", "answer": 3}])
    trajectory = out.trajectories[0]
    assert (trajectory.turns, trajectory.tool_calls, trajectory.tool_errors, trajectory.reward) == (3, 3, 3, 1.0)
    tool_messages = [m["content"] for m in trajectory.messages if m["role"] == "tool"]
    assert tool_messages[0] == "Error: tool 'calculate' raised ValueError: cannot parse '1 +' as arithmetic"
    assert tool_messages[1].startswith("Error: unknown tool 'sqrt' (available: calculate)")
    assert tool_messages[2].startswith("Error: the tool call is not valid JSON")
    assert out.metrics["tool_error_frac"] == 1.0


def test_guess_number_episodes_finish_at_different_turns(tool_tokenizer):
    tok = tool_tokenizer
    engine = ScriptedEngine(tok, binary_search_policy)
    out = driver(tok, engine, "guess_number", max_turns=5).run([{"target": 50}, {"answer": "37"}, {"target": 99}])
    summary = [(t.turns, t.reward, t.truncated) for t in out.trajectories]
    assert summary == [(1, 1.0, False), (3, 1.0, False), (5, 0.0, True)]  # 50 75 88 94 97: no 99 in 5 turns
    assert [len(prompts) for prompts, _ in engine.calls] == [3, 2, 2, 1, 1]
    feedback = [m["content"] for m in out.trajectories[1].messages if m["role"] == "user"][1:]
    assert feedback == ["Lower.", "Higher."]
    assert out.metrics["episode_truncated_frac"] == pytest.approx(1 / 3)
    assert out.metrics["turns_mean"] == pytest.approx(3.0)


def test_sampled_ids_are_kept_where_their_text_retokenizes_differently(tool_tokenizer):
    tok = tool_tokenizer
    spelled = [tok.convert_tokens_to_ids(symbol) for symbol in tok.convert_ids_to_tokens(encode(tok, "4"))]
    spelled += encode(tok, "<")[:1] + [tok.convert_tokens_to_ids(c) for c in "|im_end|>"]  # the special, as bytes
    broken_utf8 = [tok.convert_tokens_to_ids("Ã")]  # byte 0xC3 alone: decodes to U+FFFD
    reply = spelled + broken_utf8 + [tok.eos_token_id]
    assert encode(tok, tok.decode(reply, skip_special_tokens=True)) + [tok.eos_token_id] != reply
    replies = iter([reply, "50"])
    engine = ScriptedEngine(tok, lambda prompt: next(replies))
    trajectory = driver(tok, engine, "guess_number", max_turns=2).run([{"target": 50}]).trajectories[0]
    start = trajectory.prompt_len
    assert trajectory.token_ids[start:start + len(reply)] == reply
    assert trajectory.sampled_mask[start:start + len(reply)] == [True] * len(reply)
    assert [m["content"] for m in trajectory.messages[1:3]] == ["4<|im_end|>\ufffd", "Higher."]
    after = trajectory.token_ids[start + len(reply):]  # the template's "\n" after the sampled EOS, then the env's turn
    assert tok.decode(after[:after.index(tok.eos_token_id) + 1]) == "\n<|im_start|>user\nHigher.<|im_end|>"
    assert trajectory.reward == 1.0 and trajectory.turns == 2


def test_unfinished_turn_is_closed_by_the_template_and_budget_truncates(tool_tokenizer):
    tok = tool_tokenizer
    engine = ScriptedEngine(tok, lambda prompt: encode(tok, "abc"), max_new_tokens=3)  # no EOS: cut off
    trajectory = driver(tok, engine, "guess_number", max_turns=2).run([{"target": 9}]).trajectories[0]
    first_turn_end = trajectory.prompt_len + 3
    assert trajectory.token_ids[first_turn_end:first_turn_end + 2] == encode(tok, "<|im_end|>\n")
    assert trajectory.sampled_mask[first_turn_end:first_turn_end + 2] == [False, False]
    assert trajectory.turns == 2 and trajectory.truncated and trajectory.reward == 0.0
    prompt_len = trajectory.prompt_len
    budget = driver(tok, engine, "guess_number", max_turns=4, max_total_tokens=prompt_len + 2)
    short = budget.run([{"target": 9}]).trajectories[0]
    assert len(short.token_ids) == prompt_len + 2 and short.truncated and short.turns == 1
    assert len(short.logprobs) == 2


def test_engine_logprobs_equal_a_teacher_forced_forward(tool_tokenizer, tiny_model):
    tok = tool_tokenizer
    engine = HFEngine(tiny_model, tok, max_new_tokens=6, temperature=0.9, seed=5)
    calls, group_sizes = [], []
    generate = engine.generate

    def recording(prompts, group_size=1, *, greedy=False):
        rollout = generate(prompts, group_size, greedy=greedy)
        calls.append(rollout.response_ids)
        group_sizes.append(group_size)
        return rollout

    engine.generate = recording
    out = driver(tok, engine, "guess_number", max_turns=3, reuse_kv_cache=False).run([{"target": 7}, {"target": 60}],
                                                                                     2)  # (reuse: test_turn_cache)
    assert [t.turns for t in out.trajectories] == [3, 3, 3, 3]  # a random byte model never guesses right
    assert group_sizes == [2, 1, 1]  # the opening turn prefills each row's prompt once for its 2 episodes
    for index, trajectory in enumerate(out.trajectories):
        sampled = [i for i, m in zip(trajectory.token_ids, trajectory.sampled_mask) if m]
        assert sampled == [x for responses in calls for x in responses[index]]
        assert len(trajectory.logprobs) == len(sampled) == sum(len(r[index]) for r in calls)
    replies = [responses[i] for responses in calls for i in range(4)]
    assert any(encode(tok, tok.decode(r, skip_special_tokens=True)) != [x for x in r if x != tok.eos_token_id]
               for r in replies)  # some sampled bytes are not valid UTF-8: their text re-encodes differently
    policy = trajectory_logprobs(tiny_model, out.trajectories, temperature=0.9)
    gaps = [abs(a - b) for t, values in zip(out.trajectories, policy) for a, b in zip(t.logprobs, values)]
    assert len(gaps) == sum(len(t.logprobs) for t in out.trajectories) and max(gaps) <= 1e-5


class FaultyEnv:
    """Fails where example["fail"] says; `release` frees a hung call at the end of the test."""

    release = threading.Event()

    def __init__(self, example, **params):
        self.fail = example["fail"]
        if self.fail == "init":
            raise RuntimeError("no such game")

    def reset(self):
        if self.fail == "reset":
            raise KeyError("board")
        return "not messages" if self.fail == "bad_reset" else [{"role": "user", "content": "go"}]

    def step(self, reply):
        if self.fail == "step":
            raise ValueError("bad move")
        if self.fail == "hang":
            self.release.wait(30)
        if self.fail == "nan":
            return [], float("nan"), True
        return [], 1.0, True


def test_env_faults_end_their_episode_counted_and_excluded(tool_tokenizer):
    tok = tool_tokenizer
    cfg = EnvConfig(type="user", path="x.py:FaultyEnv", name="faulty", step_timeout_s=0.3, max_new_tokens_per_turn=8,
                    max_error_frac=0.9)
    kinds = ["none", "init", "reset", "bad_reset", "step", "hang", "nan"]
    try:
        out = MultiTurnDriver(ScriptedEngine(tok, lambda p: "hi", 8), tok, FaultyEnv, cfg).run(
            [{"fail": kind} for kind in kinds])
    finally:
        FaultyEnv.release.set()
    errors = [t.error for t in out.trajectories]
    assert errors[0] is None and out.trajectories[0].reward == 1.0
    assert errors[1:] == ["environment 'faulty' constructor raised RuntimeError: no such game",
                          "environment 'faulty' reset() raised KeyError: 'board'",
                          "environment 'faulty' reset() returned 'not messages', not a non-empty list of "
                          "{'role': str, 'content': str} messages",
                          "environment 'faulty' step() raised ValueError: bad move",
                          "environment 'faulty' step() timed out TimeoutError: did not return within 0.3 s",
                          "environment 'faulty' step() returned ([], nan, True), not (messages, finite reward, done)"]
    assert all(t.excluded and t.reward == 0.0 for t in out.trajectories[1:])
    assert out.metrics["env_error_frac"] == pytest.approx(6 / 7) and out.metrics["turns_mean"] == 1.0
    check_env_errors(out, cfg)  # 6/7 <= 0.9
    with pytest.raises(EnvError, match=r"^6 of 7 episodes of this step failed \(more than grpo.env.max_error_frac="
                                       r"0.5\); the first: environment 'faulty' constructor raised"):
        check_env_errors(out, EnvConfig(type="user", path="x.py:FaultyEnv", max_error_frac=0.5))


def test_template_without_tools_support_gets_the_tool_text():
    tok = byte_tokenizer()  # plain ChatML: ignores tools=
    out = driver(tok, ScriptedEngine(tok, calculator_policy)).run([{"prompt": "What is 6 * 7?", "answer": "42"}])
    trajectory = out.trajectories[0]
    assert '"name": "calculate"' in trajectory.messages[0]["content"] and trajectory.reward == 1.0
    assert tok.decode(trajectory.token_ids[:trajectory.prompt_len]).count('"name": "calculate"') == 1


def test_template_that_rewrites_earlier_turns_is_refused(tool_tokenizer):
    tok = tool_tokenizer
    tok.chat_template = tok.chat_template.replace("message.role + '\n' + message.content",
                                                  "message.role + '\n' + (message.content if loop.last or "
                                                  "message.role != 'assistant' else '...')")
    assert "loop.last" in tok.chat_template
    with pytest.raises(ConfigError, match="renders earlier turns differently once the environment's messages"):
        driver(tok, ScriptedEngine(tok, lambda p: "3"), "guess_number").run([{"target": 9}])


def test_engine_turn_length_must_match(tool_tokenizer):
    cfg = EnvConfig(type="guess_number", max_new_tokens_per_turn=16)
    with pytest.raises(ValueError, match="max_new_tokens_per_turn is 16"):
        MultiTurnDriver(ScriptedEngine(tool_tokenizer, str, max_new_tokens=8), tool_tokenizer,
                        build_env_factory(cfg), cfg)


def test_env_error_frac_counts_every_data_parallel_rank(tool_tokenizer):
    cfg = EnvConfig(type="user", path="x.py:FaultyEnv", max_error_frac=0.5, max_new_tokens_per_turn=8)
    out = MultiTurnDriver(ScriptedEngine(tool_tokenizer, lambda p: "hi", 8), tool_tokenizer, FaultyEnv, cfg).run(
        [{"fail": "none"}, {"fail": "none"}])
    check_env_errors(out, cfg)  # no failure here

    def other_rank_failed_all_four(counts):  # this rank: 0 of 2; another: 4 of 4
        return counts + torch.tensor([4.0, 4.0], dtype=torch.float64)

    with pytest.raises(EnvError, match="^4 of 6 episodes .* the first: environment 'x.py:FaultyEnv' failed on other "
                                       "data-parallel ranks$"):
        check_env_errors(out, cfg, other_rank_failed_all_four)
