"""Weight-space model merging (Linear, Task Arithmetic, TIES, DARE, SLERP, Model Stock) for nova_rt.

- `run_merge(config, out_dir, ...)`: streaming merge of local HF checkpoints from a mergekit-style YAML (engine.py);
  `nova-rt merge` (cli.py) and nova_rt's merge stage call it.
- `ops`: per-tensor ops on the C++/CUDA extension nova_rt._C with a pure-PyTorch fallback (reference.py).
- `register_merge` / `get_merge`: the method registry (registry.py; methods.py registers the built-in ones).
"""

from nova_rt.merge.config import MergeConfig, MergeConfigError, load_config
from nova_rt.merge.engine import run_merge
from nova_rt.merge.registry import ParamSpec, TensorMerge, available_merges, get_merge, register_merge

__all__ = ["MergeConfig", "MergeConfigError", "ParamSpec", "TensorMerge", "available_merges", "get_merge",
           "load_config", "register_merge", "run_merge"]
