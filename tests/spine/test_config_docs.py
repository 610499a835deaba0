"""docs/config.md is generated from the config dataclasses by scripts/gen_config_docs.py and must match the code:
a field added, renamed, retyped or re-documented without `make docs` fails here. The generator itself is checked on a
small synthetic section (choices, defaults, nested sections, attribute docstrings with a pipe and several lines), and
its section discovery (`@register_section` found with ast) against the loader's registry."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

from nova_rt import config as config_mod
from nova_rt.stages import KNOWN_STAGES

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()


def test_config_md_matches_the_code():
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    generated = generator.generate()
    assert committed == generated, ("docs/config.md is stale (" + generator.first_difference(committed, generated)
                                    + "): run `make docs` and commit it")


def test_check_mode_exits_1_on_a_stale_file_and_0_on_a_current_one(tmp_path, capsys):
    current = generator.generate()
    path = tmp_path / "config.md"
    path.write_text(current.replace("| `train.max_steps` | `int` | `100` |", "| `train.max_steps` | `int` | `50` |"),
                    encoding="utf-8")
    assert generator.main(["--check", str(path)]) == 1
    message = capsys.readouterr().err
    assert str(path) in message and "train.max_steps" in message and "make docs" in message
    assert generator.main(["--check", str(tmp_path / "missing.md")]) == 1
    path.write_text(current, encoding="utf-8")
    assert generator.main(["--check", str(path)]) == 0
    written = tmp_path / "out" / "config.md"
    assert generator.main(["--output", str(written)]) == 0
    assert written.read_text(encoding="utf-8") == current


SYNTHETIC = '''
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class Inner:
    """The inner part."""
    mode: Literal["fast", "exact"] = "exact"
    """exact | fast:
    two lines here."""
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass(kw_only=True)
class Outer:
    name: str = ""
    """A name."""
    undocumented: float = 0.5
    inner: Inner = field(default_factory=Inner)
    """Nested settings."""
    flag: bool = True
    """Last field."""
'''


def test_a_section_renders_types_choices_defaults_docstrings_and_nested_sections(tmp_path, monkeypatch):
    source = tmp_path / "synthetic_section.py"
    source.write_text(SYNTHETIC, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("synthetic_section", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "synthetic_section", module)
    spec.loader.exec_module(module)
    out: list[str] = []
    generator.render_section("demo", module.Outer, out)
    assert "\n".join(out) == textwrap.dedent("""\
        ## `demo`

        | key | type | default | meaning |
        |---|---|---|---|
        | `demo.name` | `str` | `""` | A name. |
        | `demo.undocumented` | `float` | `0.5` |  |
        | `demo.inner` | section | see [`demo.inner`](#demoinner) | Nested settings. |
        | `demo.flag` | `bool` | `true` | Last field. |

        ### `demo.inner`

        The inner part.

        | key | type | default | meaning |
        |---|---|---|---|
        | `demo.inner.mode` | one of `fast`, `exact` | `"exact"` | exact \\| fast: two lines here. |
        | `demo.inner.sizes` | `list[int]` | `[1, 2]` |  |
        """)


def test_every_section_the_loader_knows_is_documented_with_its_class():
    for stage in KNOWN_STAGES:  # a stage registers its section when its module is imported
        importlib.import_module(f"nova_rt.stages.{stage}")
    found = {name: (module, class_name) for name, module, class_name in generator.registered_sections()}
    assert set(found) == set(config_mod._SECTIONS)
    for name, cls in config_mod._SECTIONS.items():
        module, class_name = found[name]
        assert (cls.__module__, cls.__name__) == (module, class_name), name
    text = generator.generate()
    for name in config_mod._SECTIONS:
        assert f"\n## `{name}`\n" in text


@pytest.mark.parametrize("key", ["grpo.sampling.group_size", "grpo.rollout.correction", "parallel.backend"])
def test_nested_and_computed_keys_appear(key):
    assert f"| `{key}` |" in generator.generate()
