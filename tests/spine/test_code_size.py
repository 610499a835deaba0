"""House limits on size, so a file or a config section stays readable in one sitting: no file in nova_rt/ over 500
lines, no module docstring over 15 lines, no `grpo` config section (or sub-section) over 12 fields."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from nova_rt.stages.grpo import GRPOConfig

ROOT = Path(__file__).resolve().parents[2]


def test_no_file_in_nova_rt_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / "nova_rt").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 500} == {}


def test_module_docstrings_at_most_15_lines():
    """A module docstring states what the module is and why; history goes to git, numbers to docs/benchmarks.md."""
    sizes = {}
    for p in sorted((ROOT / "nova_rt").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")), clean=False)
        if docstring is not None:
            sizes[p.relative_to(ROOT).as_posix()] = docstring.count("\n") + 1
    assert len(sizes) > 50
    over = {p: n for p, n in sizes.items() if n > 15}
    assert over == {}


def _sections(cls, prefix: str):
    yield prefix, cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{prefix}.{f.name}")


def test_every_grpo_section_has_at_most_12_fields():
    sections = dict(_sections(GRPOConfig, "grpo"))
    assert {"grpo", "grpo.sampling", "grpo.data", "grpo.loss", "grpo.ptx", "grpo.eval", "grpo.rollout"} <= set(sections)
    sizes = {name: len(dataclasses.fields(cls)) for name, cls in sections.items()}
    assert all(n <= 12 for name, n in sizes.items() if name != "grpo"), sizes
    # the top level: its sub-sections plus a few keys of its own (the module docstring's "a few top-level keys")
    top_keys = [f.name for f in dataclasses.fields(GRPOConfig)
                if not dataclasses.is_dataclass(typing.get_type_hints(GRPOConfig)[f.name])]
    assert len(top_keys) <= 6, top_keys
