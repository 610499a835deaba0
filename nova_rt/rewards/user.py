"""A user reward function given as "package.module:function" (or "path/to/file.py:function").

The function receives (completions: list[str], samples: list[dict]) plus the entry's extra config keys as
keyword arguments, and returns one number per completion.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from nova_rt.rewards import register_reward


def load_function(spec: str, kind: str = "reward function") -> Callable:
    """Import `module:function` (a dotted module on sys.path, or a .py file path); `kind` names it in errors."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        what = kind.rsplit(" ", 1)[-1]  # "function"
        raise ValueError(f"{what} must look like 'package.module:{what}', got {spec!r}")
    mod_name, fn_name = spec.split(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.exists():
            raise ValueError(f"{kind} file not found: {path}")
        mspec = importlib.util.spec_from_file_location(f"nova_rt_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mspec)
        try:
            mspec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code: a SyntaxError or anything its top level raises
            raise ValueError(f"{kind} file {path} failed to load: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            raise ValueError(f"cannot import module {mod_name!r} for {kind} {spec!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - user code: a SyntaxError or anything its top level raises
            raise ValueError(f"module {mod_name!r} ({kind} {spec!r}) failed to import: "
                             f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"module {mod_name!r} has no callable {fn_name!r} ({kind} {spec!r})")
    return fn


@register_reward("user")
def user_reward(function: str, **kwargs):
    fn = load_function(function)

    def score(completions: list[str], samples: list[dict]) -> list[float]:
        return fn(completions, samples, **kwargs)

    return score
