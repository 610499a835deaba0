"""Backend registry: `parallel.backend` -> the Policy class that trains a policy (nova_rt.backends.base).

Each backend lives in nova_rt/backends/<name>.py and registers its class with @register_backend("<name>"); it is
imported on demand by get_backend, so this package imports no backend (and no stage imports one by name)."""

from __future__ import annotations

import importlib
import pkgutil

BACKENDS: dict[str, type] = {}
NOT_BACKENDS = ("base",)
"""Modules of this package that are not a backend."""


def backend_names() -> tuple[str, ...]:
    """Every backend module's name (nova_rt/backends/<name>.py), without importing any: parallel.backend's choices
    (nova_rt.config declares the key as Literal[backend_names()]), so a new backend is its file alone."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if m.name not in NOT_BACKENDS and not m.name.startswith("_")))


def register_backend(name: str):
    def deco(cls: type) -> type:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco


def get_backend(name: str) -> type:
    """The Policy class of parallel.backend `name`."""
    if name not in BACKENDS:
        try:
            importlib.import_module(f"nova_rt.backends.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nova_rt.backends.{name}":
                raise
    if name not in BACKENDS:
        raise ValueError(f"parallel.backend must be one of {', '.join(backend_names())}, got {name!r}")
    return BACKENDS[name]
