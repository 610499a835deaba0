"""Tools an environment offers the model: Python functions with a JSON schema, calls parsed from the model's text,
and calls run with a timeout. Every failure becomes a `tool` message to the model, never an exception.

Schema: given explicitly ({"function": f, "schema": {...}}) or derived from the function's type hints and its
Google-style docstring (transformers.utils.get_json_schema, the form `apply_chat_template(tools=...)` takes).
Calls: the Hermes / Qwen form `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several per reply.
Timeouts: each call (and each env constructor / reset / step, nova_rt.rollout.multiturn) runs in a fresh daemon
thread joined with a timeout. A thread, not a subprocess: tools are often bound methods of the environment whose
state they read and change, which a subprocess would not share (and forking a process that holds torch's threads
is costly and unsafe). The price: a hung Python call cannot be killed; its thread is abandoned (counted in
`hung_threads()`) and keeps running until it returns or the process exits.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_abandoned: list[threading.Thread] = []


@dataclass(frozen=True)
class Tool:
    name: str
    function: Callable
    schema: dict
    """{"type": "function", "function": {"name", "description", "parameters"}} as chat templates take it."""


def make_tool(spec) -> Tool:
    """A Tool from a function (schema from its hints and docstring) or {"function": f, "schema": {...}}."""
    from transformers.utils import get_json_schema

    if isinstance(spec, dict):
        function, schema = spec.get("function"), spec.get("schema")
        if not callable(function) or not isinstance(schema, dict):
            raise ValueError(f"a tool given as a mapping needs a callable 'function' and a 'schema' dict, got {spec!r}")
        if "function" not in schema:  # the bare {"name", "description", "parameters"}
            schema = {"type": "function", "function": schema}
    elif callable(spec):
        function = spec
        try:
            schema = get_json_schema(function)
        except Exception as exc:  # noqa: BLE001 - transformers raises several types for a docstring it cannot read
            raise ValueError(f"tool {getattr(function, '__name__', function)!r}: cannot derive its JSON schema "
                             f"({exc}); give type hints and a docstring with an Args: section, or "
                             "{'function': f, 'schema': {...}}") from None
    else:
        raise ValueError(f"a tool must be a function or {{'function': f, 'schema': {{...}}}}, got {spec!r}")
    name = schema.get("function", {}).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool schema has no function name: {schema!r}")
    return Tool(name, function, schema)


def make_tools(specs) -> list[Tool]:
    tools = [make_tool(spec) for spec in (specs or [])]
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return tools


@dataclass(frozen=True)
class ToolCall:
    name: str | None
    arguments: dict
    error: str | None = None
    """Why the call could not be parsed (then name/arguments are not usable)."""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` in `text` (an unclosed last one counts as a malformed call)."""
    calls = []
    for match in TOOL_CALL_RE.finditer(text):
        calls.append(_parse_one(match.group(1)))
    end = text.rfind("</tool_call>")
    tail = text[end + len("</tool_call>"):] if end >= 0 else text
    if "<tool_call>" in tail:
        calls.append(ToolCall(None, {}, "a <tool_call> without its closing </tool_call>"))
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCall(None, {}, f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall(None, {}, 'the tool call must be a JSON object {"name": ..., "arguments": {...}}')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], {}, f"the arguments of tool {data['name']!r} must be a JSON object")
    return ToolCall(data["name"], arguments)


def call_with_timeout(function: Callable, timeout_s: float, *args, **kwargs):
    """function(*args, **kwargs) in a fresh daemon thread: its result, or its exception re-raised, or TimeoutError
    after timeout_s (the thread is abandoned and counted in hung_threads())."""
    box: dict = {}

    def target():
        try:
            box["value"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="nova-env-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _abandoned.append(thread)
        raise TimeoutError(f"did not return within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def hung_threads() -> int:
    """Abandoned (timed-out) calls whose threads are still running."""
    _abandoned[:] = [thread for thread in _abandoned if thread.is_alive()]
    return len(_abandoned)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def run_tool_calls(calls: list[ToolCall], tools: list[Tool], timeout_s: float) -> tuple[list[dict], int]:
    """(one `tool` message per call, the number of calls that failed): unparseable, unknown tool, bad arguments,
    raised, timed out or returned something that is not text/JSON."""
    by_name = {tool.name: tool for tool in tools}
    messages, errors = [], 0
    for call in calls:
        if call.error is not None:
            content = f"Error: {call.error}."
        elif call.name not in by_name:
            content = f"Error: unknown tool {call.name!r} (available: {', '.join(sorted(by_name)) or 'none'})."
        else:
            try:
                result = call_with_timeout(by_name[call.name].function, timeout_s, **call.arguments)
                content = result if isinstance(result, str) else json.dumps(result, default=str)
            except TimeoutError as exc:
                content = f"Error: tool {call.name!r} {exc}."
            except Exception as exc:  # noqa: BLE001 - user code; the model sees the reason
                content = f"Error: tool {call.name!r} raised {_reason(exc)}"
            else:
                messages.append({"role": "tool", "name": call.name, "content": content})
                continue
        errors += 1
        messages.append({"role": "tool", "name": call.name or "", "content": content})
    return messages, errors


def tools_system_text(tools: list[Tool]) -> str:
    """The Hermes tool block for chat templates that ignore `tools=` (added to the system message)."""
    schemas = "\n".join(json.dumps(tool.schema) for tool in tools)
    return ("Tools you can use (JSON schemas, one per line):\n" + schemas + "\nTo use one, write "
            '<tool_call>{"name": "<tool name>", "arguments": {<its arguments>}}</tool_call>; its result comes back in '
            "the next message. Reply without a tool call to give your final answer.")
