"""Renamed config keys, read for one release (issue 13: the grpo section's flat keys moved into sub-sections).

A section registers its renames with `nova_rt.config.register_section(name, renamed={"old_field": "sub.new_field"})`.
The loader (nova_rt.config) passes each raw YAML mapping through `migrate_raw` and each `--set` / override list
through `rename_keys`; the dotted keys of `pipeline.stage_overrides` go through the same mapping. An old key is moved
to its new place with one line `nova_rt: <old> is deprecated, use <new> (read for one release)`; an old and a new
key for the same field with different values is a ConfigError (exit 2) naming both.

`renames` below is the loader's lookup `section -> {old field: new dotted path under the section}` (it imports a
stage's module on demand); passing it in keeps this module free of nova_rt.config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from nova_rt.errors import ConfigError

Renames = Callable[[str], dict[str, str]]

OVERRIDE_MAPS = (("pipeline", "stage_overrides"),)
"""(section, field) whose values map dotted config keys to values per stage: their keys are renamed too."""


def deprecated(old: str, new: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank reads the config: rank 0 says it once
        logging.getLogger("nova_rt.config").warning("nova_rt: %s is deprecated, use %s (read for one release)",
                                                    old, new)


def renamed_key(key: str, renames: Renames) -> str:
    """The current name of a dotted key: `grpo.eval_every` -> `grpo.eval.every` (with one deprecation line)."""
    section, _, rest = key.partition(".")
    new = renames(section).get(rest) if rest else None
    if new is None:
        return key
    deprecated(key, f"{section}.{new}")
    return f"{section}.{new}"


def _conflict(source: str, old: str, new: str, old_value: Any, new_value: Any) -> ConfigError:
    return ConfigError(f"{source}: {old} (deprecated) and {new} are both given, with different values "
                       f"({old_value!r} vs {new_value!r}); keep only {new}")


def rename_keys(items: list[tuple[str, Any]], source: str, renames: Renames) -> list[tuple[str, Any]]:
    """Dotted (key, value) overrides with renamed keys moved to their new names; an old and a new key for the same
    field with different values is an error naming both (the same key given twice: the later wins, as before)."""
    seen: dict[str, tuple[str, Any]] = {}
    out = []
    for key, value in items:
        new = renamed_key(key, renames)
        if new in seen and seen[new][0] != key and seen[new][1] != value:
            (k0, v0), (k1, v1) = sorted([seen[new], (key, value)], key=lambda kv: kv[0] == new)
            raise _conflict(source, k0, k1, v0, v1)
        seen[new] = (key, value)
        out.append((new, value))
    return out


def migrate_raw(raw: dict, source: str, renames: Renames) -> dict:
    """Move renamed keys of a raw config mapping (sections, and the dotted keys of pipeline.stage_overrides) to
    their new places, in place; returns raw."""
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        for old, new in renames(section).items():
            if old not in values:
                continue
            value = values.pop(old)
            *path, last = new.split(".")
            node = values
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{source}: {section}.{'.'.join(path)}: expected a mapping, got {node!r}")
            if last in node and node[last] != value:
                raise _conflict(source, f"{section}.{old}", f"{section}.{new}", value, node[last])
            deprecated(f"{section}.{old}", f"{section}.{new}")
            node[last] = value
    for section, name in OVERRIDE_MAPS:
        maps = raw.get(section, {}).get(name) if isinstance(raw.get(section), dict) else None
        for key, ovr in (maps or {}).items() if isinstance(maps, dict) else ():
            if isinstance(ovr, dict):
                maps[key] = dict(rename_keys(list(ovr.items()), f"{source}: {section}.{name}.{key}", renames))
    return raw
