"""The merge registry imports no method (dependencies run registry <- methods <- config), yet every public way to
look a method up still sees the built-in ones. Fresh interpreters, so nothing imported by other tests hides it."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_registry_alone_imports_no_method():
    assert _run("import sys, nova_rt.merge.registry as r; print('nova_rt.merge.methods' in sys.modules, "
                "r.available_merges())") == "False []"


def test_package_and_config_lookups_see_the_builtin_methods():
    out = _run("from nova_rt.merge import available_merges, get_merge, MergeConfigError\n"
               "from nova_rt.merge.config import get_merge as config_get\n"
               "from nova_rt.merge.methods import MergeConfigError as M\n"
               "from nova_rt.errors import UserError\n"
               "print(available_merges(), get_merge('ties').name, config_get('slerp').name,"
               " MergeConfigError is M and issubclass(M, UserError))")
    assert out == ("['arcee_fusion', 'breadcrumbs', 'breadcrumbs_ties', 'dare_linear', 'dare_ties', 'della', "
                   "'della_linear', 'karcher', 'linear', 'model_stock', 'multislerp', 'nearswap', 'nuslerp', "
                   "'ram', 'ramplus_tl', 'sce', 'slerp', 'task_arithmetic', 'ties'] ties slerp True")
