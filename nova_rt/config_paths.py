"""Relative paths in an included config file are relative to that file (nova_rt.config.load_raw calls
`relocate_paths` on each included file before merging it), so `include: ../base.yaml` keeps the base's data and model
paths pointing where its author meant. The top-level file's paths and `--set` values stay as they are and are
resolved later by nova_rt.config.resolve_path (the current directory first, then the top-level file's directory).

PATH_KEYS are the keys whose values are paths (a string or a list of strings); `grpo.rewards[].path` (a reward model)
and the file of `grpo.rewards[].function: file.py:function` too, and the same keys inside
`pipeline.stage_overrides.<stage>` and the files of `pipeline.sft_slices[]`. Absolute paths, empty values and names
such as `tiny:llama` / `builtin:NAME` (a scheme before the first /) are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PATH_KEYS = ("model.path", "model.tokenizer", "data.train_files", "data.eval_files", "grpo.ref_model",
             "grpo.data.prompt_files", "grpo.data.eval_files", "grpo.data.pas_model", "grpo.ptx.files",
             "dpo.reference", "merge.spec", "pas.input_files", "pas.seeds_file")


def _relocate(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_relocate(v, base) for v in value]
    if not isinstance(value, str) or not value or ":" in value.split("/")[0] or Path(value).is_absolute():
        return value
    return str(base / value)


def _relocate_rewards(rewards: Any, base: Path) -> None:
    for spec in rewards if isinstance(rewards, list) else []:
        if not isinstance(spec, dict):
            continue
        if spec.get("type") == "reward_model" and "path" in spec:
            spec["path"] = _relocate(spec["path"], base)
        function = spec.get("function")
        if spec.get("type") == "user" and isinstance(function, str) and function.count(":") == 1:
            file, name = function.split(":")
            if file.endswith(".py"):
                spec["function"] = f"{_relocate(file, base)}:{name}"


def relocate_paths(raw: dict, base: Path) -> None:
    """Rewrite, in place, the relative paths that the config mapping `raw` (one file's own keys) sets, as paths
    under `base` (that file's directory)."""
    base = base.absolute()
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _relocate(node[leaf], base)
    grpo = raw.get("grpo")
    if isinstance(grpo, dict):
        _relocate_rewards(grpo.get("rewards"), base)
    pipeline = raw.get("pipeline")
    if not isinstance(pipeline, dict):
        return
    for overrides in (pipeline.get("stage_overrides") or {}).values():
        if isinstance(overrides, dict):
            for key in overrides:
                if key in PATH_KEYS:
                    overrides[key] = _relocate(overrides[key], base)
            _relocate_rewards(overrides.get("grpo.rewards"), base)
    for part in pipeline.get("sft_slices") or []:
        if isinstance(part, dict):
            for key in ("train_files", "eval_files"):
                if key in part:
                    part[key] = _relocate(part[key], base)
