"""Backend registry: `parallel.backend` -> the PolicyBackend class that trains a policy (nova_rt.backends.base).

Each backend lives in nova_rt/backends/<name>.py and registers its class with @register_backend("<name>"); it is
imported on demand by get_backend, so this package imports no backend (and no stage imports one by name)."""

from __future__ import annotations

import importlib

BACKENDS: dict[str, type] = {}


def register_backend(name: str):
    def deco(cls: type) -> type:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco


def get_backend(name: str) -> type:
    """The PolicyBackend class of parallel.backend `name`."""
    if name not in BACKENDS:
        try:
            importlib.import_module(f"nova_rt.backends.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nova_rt.backends.{name}":
                raise
    if name not in BACKENDS:
        raise ValueError(f"parallel.backend must be one of hf, megatron, got {name!r}")
    return BACKENDS[name]
