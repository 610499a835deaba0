"""Tools: schemas from type hints + docstrings (or explicit), Hermes <tool_call> parsing, and every failure (bad
JSON, unknown tool, bad arguments, a raising tool, a tool past its timeout) as a counted `tool` error message; the
calculator tool's safe evaluation."""

from __future__ import annotations

import threading
import time

import pytest

from nova_rt.envs.calculator import calculate, calculator_problems, safe_calculate
from nova_rt.envs.tools import hung_threads, make_tool, make_tools, parse_tool_calls, run_tool_calls


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def boom(x: str) -> str:
    """Always fails.

    Args:
        x: anything
    """
    raise RuntimeError("the tool broke")


def test_schema_from_hints_and_docstring_or_explicit():
    tool = make_tool(add)
    assert tool.name == "add"
    assert tool.schema["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first"}
    assert tool.schema["function"]["parameters"]["required"] == ["a", "b"]
    explicit = make_tool({"function": lambda q: q, "schema": {"name": "echo", "description": "echo",
                                                             "parameters": {"type": "object", "properties": {}}}})
    assert explicit.name == "echo" and explicit.schema["type"] == "function"
    with pytest.raises(ValueError, match="cannot derive its JSON schema"):
        make_tool(lambda x: x)
    with pytest.raises(ValueError, match="tool names must be unique"):
        make_tools([add, add])


def test_parse_good_and_malformed_calls():
    text = ('thinking <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> and '
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call><tool_call>[1]</tool_call>'
            '<tool_call>{"name": "add", "arguments": 5}</tool_call><tool_call>{"name": "add"')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error is None) for c in calls[:2]] == [("add", {"a": 1, "b": 2}, True),
                                                                         ("add", {"a": 3, "b": 4}, True)]
    assert "not valid JSON" in calls[2].error
    assert "must be a JSON object" in calls[3].error
    assert "arguments of tool 'add' must be a JSON object" in calls[4].error
    assert "without its closing" in calls[5].error
    assert len(calls) == 6
    assert parse_tool_calls("no calls here") == []


def test_failures_become_tool_messages_counted():
    release = threading.Event()

    def hang(x: str) -> str:
        """Waits.

        Args:
            x: anything
        """
        release.wait(30)
        return "late"

    tools = make_tools([add, boom, hang])
    calls = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3</tool_call>'
        '<tool_call>{"name": "mul", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"c": 1}}</tool_call>'
        '<tool_call>{"name": "boom", "arguments": {"x": "?"}}</tool_call>'
        '<tool_call>{"name": "hang", "arguments": {"x": "?"}}</tool_call>')
    before = hung_threads()
    t0 = time.perf_counter()
    messages, errors = run_tool_calls(calls, tools, timeout_s=0.3)
    assert time.perf_counter() - t0 < 5
    try:
        assert errors == 5 and len(messages) == 6 and all(m["role"] == "tool" for m in messages)
        contents = [m["content"] for m in messages]
        assert contents[0] == "5"
        assert contents[1].startswith("Error: the tool call is not valid JSON")
        assert contents[2] == "Error: unknown tool 'mul' (available: add, boom, hang)."
        assert contents[3].startswith("Error: tool 'add' raised TypeError:") and "'c'" in contents[3]
        assert contents[4] == "Error: tool 'boom' raised RuntimeError: the tool broke"
        assert contents[5] == "Error: tool 'hang' did not return within 0.3 s."
        assert hung_threads() == before + 1
    finally:
        release.set()


@pytest.mark.parametrize("expression, value", [("2 + 3 * 4", "14"), ("(12 + 7) * 3", "57"), ("7 / 2", "3.5"),
                                               ("2 ** 10", "1024"), ("-3 - -4", "1"), ("0.1 + 0.2", "0.3"),
                                               ("17 // 5 + 17 % 5", "5"), ("1/3", "0.333333333333")])
def test_calculate(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('true')", "not Call"), ("x + 1", "not Name"), ("1 / 0", "division by zero"),
    ("2 ** 1000", "exponents must be whole numbers up to 64"), ("9 ** 64 ** 2", "exponents"),
    ("1 +", "cannot parse"), ("(1).real", "not Attribute"), ("9" * 201, "longer than 200"),
    ("99999999999 ** 10 * 99999999999 ** 10", "beyond 100 digits"), ("999 ** 64", "beyond 100 digits"),
    ("True + 1", "not Constant")])
def test_calculate_refuses_anything_but_arithmetic(expression, error):
    with pytest.raises((ValueError, ZeroDivisionError), match=error):
        safe_calculate(expression)


def test_problems_are_seeded_and_answered():
    rows = calculator_problems(5, seed=3)
    assert rows == calculator_problems(5, seed=3) and rows != calculator_problems(5, seed=4)
    for row in rows:
        assert row["answer"] == safe_calculate(row["prompt"][len("What is "):-1])
