"""The `calculator` environment: multi-step arithmetic with a `calculate(expression)` tool.

The data row gives the question (`messages` or `prompt`) and its `answer`. The model may call the tool any number of
times (the driver runs it and returns the result); its first reply without a tool call is its answer, scored by
the math verifier of the rewards (nova_rt.rewards.math: 1.0 when it matches, else 0.0), and the episode ends.
The tool evaluates + - * / // % ** and parentheses on numbers exactly (fractions.Fraction) from Python's syntax tree:
names, calls, attributes and every other construct are refused (no eval()), and sizes are bounded.
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction

from nova_rt.envs import register_env
from nova_rt.rewards.math import answers_match, extract_answer

SYSTEM = ("Solve the arithmetic problem. You can use the calculate tool for any step. When you know the result, "
          "reply with the final answer only, as: The answer is <number>.")
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Mod: lambda a, b: a % b}
_MAX_CHARS, _MAX_EXPONENT, _MAX_DIGITS = 200, 64, 100


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _value(node.left), _value(node.right)
        if exponent.denominator != 1 or abs(exponent) > _MAX_EXPONENT:
            raise ValueError(f"exponents must be whole numbers up to {_MAX_EXPONENT}")
        if base == 0 and exponent < 0:
            raise ZeroDivisionError("0 cannot be raised to a negative power")
        return _bounded(base ** int(exponent))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            raise ZeroDivisionError("division by zero")
        return _bounded(_BINARY[type(node.op)](left, right))
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")


def _bounded(value: Fraction) -> Fraction:
    if len(str(value.numerator)) > _MAX_DIGITS or len(str(value.denominator)) > _MAX_DIGITS:
        raise ValueError(f"numbers beyond {_MAX_DIGITS} digits are not supported")
    return value


def format_number(value: Fraction) -> str:
    """An integer as such, else a decimal with up to 12 significant digits."""
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.12g}"


def safe_calculate(expression: str) -> str:
    """The exact value of an arithmetic expression, as text (ValueError / ZeroDivisionError when it has none)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("expression must be a non-empty string")
    if len(expression) > _MAX_CHARS:
        raise ValueError(f"expression longer than {_MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r} as arithmetic") from None
    return format_number(_value(tree.body))


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "(12 + 7) * 3"
    """
    return safe_calculate(expression)


def opening_messages(example: dict, system: str) -> list[dict]:
    """The row's `messages` (or `prompt` as one user message), with `system` first unless the row has one."""
    if isinstance(example.get("messages"), list) and example["messages"]:
        messages = [dict(message) for message in example["messages"]]
    elif isinstance(example.get("prompt"), str):
        messages = [{"role": "user", "content": example["prompt"]}]
    else:
        raise ValueError("the data row has neither 'messages' nor 'prompt'")
    if system and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


@register_env("calculator")
class CalculatorEnv:
    """One arithmetic question; tool: calculate; reward 1.0 for the right final answer (params: system)."""

    def __init__(self, example: dict, system: str = SYSTEM):
        if example.get("answer") is None:
            raise ValueError("the data row has no 'answer' to check the final reply against")
        self.example, self.answer, self.system = example, example["answer"], system
        self.tools = [calculate]

    def reset(self) -> list[dict]:
        return opening_messages(self.example, self.system)

    def step(self, reply: str) -> tuple[list[dict], float, bool]:
        return [], 1.0 if answers_match(extract_answer(reply), self.answer) else 0.0, True


def calculator_problems(count: int, *, seed: int = 0, operations: int = 3, largest: int = 99) -> list[dict]:
    """`count` rows {"prompt", "answer"}: integer expressions with `operations` operators (+ - *) on 2..largest."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        expression = str(rng.randint(2, largest))
        for _ in range(operations):
            expression += f" {rng.choice('+-*')} {rng.randint(2, largest)}"
        rows.append({"prompt": f"What is {expression}?", "answer": safe_calculate(expression)})
    return rows
