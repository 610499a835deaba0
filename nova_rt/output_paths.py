"""Outputs never hold inputs: the check every command that writes runs before it touches anything.

A command's output (merge's OUT_DIR, a run's run.dir) and its inputs (model directories, data files, tokenizer
sources, the config file) are compared by their real paths, so a symlink or `..` does not hide that they are the same.
Replacing the output (`--force`, a rerun's new final/) would delete an input inside it, and writing an output inside
an input directory (or into the same directory) would change that input: both are a ConfigError (exit 2) whose one
line names the output and the input, before anything is read or written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from fnmatch import fnmatch
from pathlib import Path

from nova_rt.errors import ConfigError


def real_path(path: str | Path) -> Path:
    """The absolute path with every symlink and `..` resolved (the part that does not exist yet kept as written)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _shown(path: str | Path) -> str:
    resolved = real_path(path)
    return str(path) if str(path) == str(resolved) else f"{path} (= {resolved})"


def is_local(path: str | Path) -> bool:
    """False for names that are not files: empty, builtin:NAME, tiny:ARCH, a URL."""
    text = str(path)
    return bool(text) and ":" not in text.split("/")[0]


def check_output_disjoint(output: str | Path, inputs: Mapping[str, str | Path], what: str,
                          written: Iterable[str] | None = None) -> None:
    """ConfigError unless `output` and every input are apart: neither inside the other, not the same path.

    inputs: {label (a config key or argument name) -> path}; non-local names (is_local) are skipped. what: how the
    message names the output (e.g. "OUT_DIR", "run.dir"). written: glob patterns of the entries directly under
    `output` that the command writes, replaces or deletes; an input inside `output` is refused only under one of
    them (None: anywhere in `output`). The output inside an input, or the same path, is always refused.
    """
    out = real_path(output)
    patterns = None if written is None else tuple(written)
    for label, path in inputs.items():
        if not is_local(path):
            continue
        source = real_path(path)
        if source == out:
            raise ConfigError(f"{what} {_shown(output)} is the same path as {label} {_shown(path)}: the output "
                              "would replace that input; choose another output")
        if out.is_relative_to(source):
            raise ConfigError(f"{what} {_shown(output)} is inside {label} {_shown(path)}: writing it would change "
                              "that input; choose an output outside it")
        if source.is_relative_to(out):
            top = source.relative_to(out).parts[0]
            if patterns is None or any(fnmatch(top, p) for p in patterns):
                which = "which" if patterns is None else f"whose {top}"
                raise ConfigError(f"{label} {_shown(path)} is inside {what} {_shown(output)}, {which} this command "
                                  "replaces: move the input out of it or choose another output")
