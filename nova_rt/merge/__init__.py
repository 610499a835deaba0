"""Weight-space model merging (Linear, Task Arithmetic, TIES, DARE, SLERP, Model Stock) for nova_rt.

- `run_merge(config, out_dir, ...)`: streaming merge of local HF checkpoints from a mergekit-style YAML (engine.py);
  `nova-rt merge` (cli.py) and nova_rt's merge stage call it.
- `ops`: per-tensor ops on the C++/CUDA extension nova_rt._C with a pure-PyTorch fallback (reference.py).
- `register_merge` / `get_merge`: the method registry (registry.py; methods.py registers the built-in ones).

Names are imported on first use (PEP 562), so `python -m nova_rt.merge.cli` can tune the process (OpenMP wait
policy, garbage collector) before torch loads.
"""

import importlib

_EXPORTS = {"MergeConfig": "config", "MergeConfigError": "config", "load_config": "config", "run_merge": "engine",
            "ParamSpec": "registry", "TensorMerge": "registry", "available_merges": "registry",
            "get_merge": "registry", "register_merge": "registry"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nova_rt.merge' has no attribute {name!r}")
    if _EXPORTS[name] == "registry":
        import nova_rt.merge.methods  # noqa: F401 - the built-in methods register themselves on import
    value = getattr(importlib.import_module(f"nova_rt.merge.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
