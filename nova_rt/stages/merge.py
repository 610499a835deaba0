"""The `merge` stage: the same streaming engine as `nova-rt merge`, driven from a nova_rt config.

    run: {stage: merge, dir: runs/merged}
    merge:
      spec: configs/merge_model_stock.yaml    # a mergekit-style YAML file, or put the mapping inline under `inline`
      out: ""                                 # default: <run.dir>/merged
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nova_rt.config import Config, register_section, resolve_path
from nova_rt.stages import register_stage


@register_section("merge")
@dataclass(kw_only=True)
class MergeStageConfig:
    spec: str = ""
    """Path of a mergekit-style YAML (merge_method, base_model, models, parameters, dtype, tokenizer_source)."""
    inline: dict = field(default_factory=dict)
    """The same mapping inline (used when `spec` is empty)."""
    out: str = ""
    """Output HF directory; default <run.dir>/merged."""
    device: str = "cpu"
    """Where the merge math runs: cpu, cuda or cuda:N (I/O always goes through host memory)."""
    force: bool = False
    """Replace an existing output directory."""
    max_shard_size: str = "2GB"
    """Largest output safetensors shard, e.g. 2GB, 500MB or 500MiB (nova_rt.merge.st_io.parse_size)."""

    def validate(self) -> None:
        if bool(self.spec) == bool(self.inline):
            raise ValueError("set exactly one of merge.spec (a YAML path) or merge.inline (a mapping)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"merge.device: must be cpu, cuda or cuda:N, got {self.device!r}")


@register_stage("merge")
def run(cfg: Config) -> dict:
    from nova_rt.merge import run_merge

    m = cfg.merge
    out = Path(m.out or Path(cfg.run.dir) / "merged")
    spec = resolve_path(cfg, m.spec) if m.spec else dict(m.inline)
    path = run_merge(spec, out, device=m.device, force=m.force, max_shard_size=m.max_shard_size)
    return {"merged": str(path)}
