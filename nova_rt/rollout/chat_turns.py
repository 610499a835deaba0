"""The chat template's view of a multi-turn episode (nova_rt.rollout.multiturn): the opening prompt, and the ids
the template adds after a sampled assistant turn for the environment's messages, computed as a difference of
renderings and checked, so that a trajectory's non-sampled ids are exactly what the template renders.

Tools are passed to `apply_chat_template(tools=[schemas])`; a template that ignores them (its rendering is the same
with and without) gets the tool block in the system message instead (nova_rt.envs.tools.tools_system_text).
A template that renders earlier turns differently once later messages follow cannot give token-in-token-out
trajectories: that is a ConfigError naming the check that failed.
"""

from __future__ import annotations

from nova_rt.envs.tools import Tool, tools_system_text
from nova_rt.errors import ConfigError

_MARK = "\x00nova-assistant-turn\x00"


class ChatRenderer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._ignores_tools: dict[tuple, bool] = {}
        probe = self.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}], [],
                            generation_prompt=False)
        if _MARK not in probe:
            raise ConfigError("model.path: its chat template does not render an assistant message's content as "
                              "given, so multi-turn rollouts cannot locate the end of a turn")
        self.turn_end = probe[probe.index(_MARK) + len(_MARK):]
        """The template's text after an assistant turn's content (ChatML: '<|im_end|>\\n')."""
        self.turn_end_ids = self.encode(self.turn_end)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def render(self, messages: list[dict], tools: list[Tool], *, generation_prompt: bool) -> str:
        schemas = [tool.schema for tool in tools] if tools and not self.ignores_tools(tools) else None
        try:
            return self.tok.apply_chat_template(messages, tools=schemas, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - templates are user code (jinja raise_exception, TypeError, ...)
            roles = [m.get("role") for m in messages]
            raise ConfigError(f"model.path: the chat template cannot render the episode's conversation (roles "
                              f"{roles}): {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc

    def ignores_tools(self, tools: list[Tool]) -> bool:
        key = tuple(tool.name for tool in tools)
        if key not in self._ignores_tools:
            probe = [{"role": "user", "content": "?"}]
            self._ignores_tools[key] = False  # render() below must pass the schemas
            with_tools = self.render(probe, tools, generation_prompt=True)
            self._ignores_tools[key] = with_tools == self.render(probe, [], generation_prompt=True)
        return self._ignores_tools[key]

    def with_tool_text(self, messages: list[dict], tools: list[Tool]) -> list[dict]:
        """`messages`, with the tool block in the system message when the template ignores `tools=`."""
        if not tools or not self.ignores_tools(tools):
            return messages
        text = tools_system_text(tools)
        if messages and messages[0].get("role") == "system":
            return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
        return [{"role": "system", "content": text}] + messages

    def continuation(self, conversation: list[dict], new_messages: list[dict], tools: list[Tool], rendered: str,
                     sampled: list[int], finished: bool) -> tuple[list[int], str]:
        """(the ids after the sampled ids of the last assistant turn of `conversation` up to the next generation
        prompt, the new rendering). rendered: the rendering the turn was sampled after (ends with the generation
        prompt); finished: the sampled ids end with an EOS token."""
        before = self.render(conversation, tools, generation_prompt=False)
        if not before.startswith(rendered):
            raise ConfigError("model.path: the chat template renders a conversation with a new assistant turn in a "
                              "way that does not extend the generation prompt it was sampled after; multi-turn "
                              "rollouts need prefix-stable renderings")
        if not before.endswith(self.turn_end):
            raise ConfigError(f"model.path: the chat template ends this assistant turn differently from "
                              f"{self.turn_end!r}; multi-turn rollouts need one end-of-turn form")
        after = self.render(conversation + new_messages, tools, generation_prompt=True)
        if not after.startswith(before):
            raise ConfigError("model.path: the chat template renders earlier turns differently once the "
                              "environment's messages follow; multi-turn rollouts need prefix-stable renderings")
        before_ids, after_ids = self.encode(before), self.encode(after)
        if after_ids[:len(before_ids)] != before_ids or before_ids[len(before_ids) - len(self.turn_end_ids):] \
                != self.turn_end_ids:
            raise ConfigError("model.path: the tokenizer merges tokens across the boundary of a turn in the chat "
                              "template's rendering, so the environment's tokens cannot follow the sampled ones")
        tail = self.turn_end_ids
        if finished and sampled and tail and tail[0] == sampled[-1]:  # the sampled EOS closes the turn itself
            tail = tail[1:]
        return tail + after_ids[len(before_ids):], after
