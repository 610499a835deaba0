"""scripts/import_cycles.py on small packages written here: it finds module-level and function-level cycles (relative
imports, `from pkg import submodule`, nested packages), ignores TYPE_CHECKING imports and outside modules, and exits 1
only when a cycle exists."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
import_cycles = sys.modules["import_cycles"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(import_cycles)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_no_cycle_exits_0(tmp_path, capsys):
    root = _package(tmp_path, {"a.py": "import os\nimport torch\nfrom pkg import b\n", "b.py": "from . import c\n",
                               "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"})
    assert import_cycles.main(["--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "no import cycles" in out and "2 internal imports" in out, out  # not the TYPE_CHECKING one


def test_function_level_cycle_is_found_and_marked(tmp_path, capsys):
    root = _package(tmp_path, {"a.py": "from pkg.b import f\n",
                               "b.py": "def f():\n    from .a import g\n    return g\n"})
    assert import_cycles.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "cycle 1: pkg.a -> pkg.b -> pkg.a  (closed by function-level imports)" in out, out
    assert "pkg.b -> pkg.a  (line 2) [function-level in f()]" in out
    assert "pkg.a -> pkg.b  (line 1) [module-level]" in out


def test_module_level_cycle_through_a_subpackage(tmp_path, capsys):
    root = _package(tmp_path, {"sub/__init__.py": "", "sub/x.py": "from ..y import Y\n",
                               "y.py": "import pkg.z\n", "z.py": "from pkg.sub import x\nY = 1\n"})
    assert import_cycles.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "pkg.sub.x -> pkg.y -> pkg.z -> pkg.sub.x  (module-level: every hop runs at import time)" in out, out


def test_nova_rt_cycles_are_listed():
    """The script parses the real package (docs/architecture.md: it finds none today)."""
    edges = import_cycles.import_edges(ROOT / "nova_rt")
    assert any(e.src == "nova_rt.stages.sft" and e.dst == "nova_rt.stages.common" for e in edges)
    pairs = {(e.src, e.dst) for e in edges}
    assert ("nova_rt.merge.registry", "nova_rt.merge.methods") not in pairs
    # the engine chooser imports the vLLM engine (inside build_rollout_engine); what both need is in rollout.base
    assert ("nova_rt.rollout.engine", "nova_rt.rollout.vllm_engine") in pairs
    assert ("nova_rt.rollout.vllm_engine", "nova_rt.rollout.engine") not in pairs
