"""What a checkpoint was written by, so that a run resumes only its own checkpoints: the stage, the model (model.path
and a digest of its parameter names and shapes), the training data files (path, size, mtime_ns and the sha256 of
the content; files over 512 MiB: of their first and last 256 MiB) and the config values that change the math
(math_config: optim, batch sizes, precision, seed, data and packing settings, the stage's own section; not logging,
checkpoint.every/keep_last, train.max_steps, which a run may extend, nor run.dir).

It is kept in every checkpoint (state.pt's `provenance`; meta.json's on the megatron backend), both covered by the
checkpoint's manifest. Resuming from one that differs is a CheckpointError (exit 2) naming each difference, unless
checkpoint.resume is "force" (a warning lists them); a checkpoint of an older version (none recorded) resumes with
a warning. The run's config.json is written once the run is accepted, so a refused run leaves the previous one's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nova_rt.config import Config, resolve_path
from nova_rt.distributed import broadcast_object
from nova_rt.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = 1
MATH_KEYS = ("run.seed", "model.dtype", "model.master_weights", "data.max_seq_len", "data.overlong",
             "data.system_prompt", "data.shuffle", "packing.enabled", "packing.max_tokens", "train.global_batch",
             "train.micro_batch", "train.loss_reduction", "train.precision", "lora.rank", "lora.alpha", "lora.dropout",
             "lora.target_modules")
"""Core config values that change what a step computes (with every optim.* but optim.fused)."""
STAGE_SECTIONS = ("dpo", "rm", "grpo")
"""Stages with a config section of their own: all of it counts, but for NOT_MATH and the file lists."""
NOT_MATH = ("dpo.reference_logprobs", "grpo.eval.every", "grpo.eval.batch", "grpo.micro_prompts", "grpo.rollout.")
"""Stage keys (or prefixes, ending in '.') that change how, not what, is computed; grpo.rollout.correction* count."""
WHOLE_FILE_LIMIT = 512 << 20
_digests: dict[tuple[str, int, int], str] = {}
"""(path, size, mtime_ns) -> sha256: a file is hashed once per process."""


# ----------------------------------------------------------------------------------------------- what is recorded
def math_config(cfg: Config) -> dict[str, Any]:
    """The dotted config values of this run that change the math (see the module docstring)."""
    out = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
           for key in MATH_KEYS if hasattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])}
    out.update({k: v for k, v in _flatten("optim", cfg.optim).items() if k != "optim.fused"})
    stage = cfg.run.stage
    if stage in STAGE_SECTIONS:
        out.update({k: v for k, v in _flatten(stage, getattr(cfg, stage)).items()
                    if not k.endswith("files") and not _not_math(k)})
    return out


def _not_math(key: str) -> bool:
    return not key.startswith("grpo.rollout.correction") and any(
        key == n or (n.endswith(".") and key.startswith(n)) for n in NOT_MATH)


def _flatten(prefix: str, section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flatten(f"{prefix}.{f.name}", value))
        else:  # JSON round trip: what meta.json gives back (tuples as lists, dict keys as strings)
            out[f"{prefix}.{f.name}"] = json.loads(json.dumps(value))
    return out


def training_files(cfg: Config) -> list[str]:
    """The data files a step of this stage trains on (resolved as the stages resolve them)."""
    if cfg.run.stage == "grpo":
        files = [*cfg.grpo.data.prompt_files, *cfg.grpo.ptx.files]
    else:
        files = list(cfg.data.train_files)
    return [resolve_path(cfg, f) for f in files]


def file_fingerprint(path: str) -> dict:
    """{path, bytes, mtime_ns, sha256} of a file or a directory (its files in name order); {path} when it is not a
    local file (nothing to compare but the name)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        return {"path": path}
    h = hashlib.sha256()
    size = mtime = 0
    for f in files:
        st = f.stat()
        size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
        h.update(f"{f.relative_to(p) if p.is_dir() else ''}\0{_digest(f, st)}\n".encode())
    return {"path": path, "bytes": size, "mtime_ns": mtime, "sha256": h.hexdigest()}


def _digest(path: Path, st: os.stat_result) -> str:
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            ranges = [(0, st.st_size)] if st.st_size <= WHOLE_FILE_LIMIT else \
                [(0, WHOLE_FILE_LIMIT // 2), (st.st_size - WHOLE_FILE_LIMIT // 2, WHOLE_FILE_LIMIT // 2)]
            for start, length in ranges:
                f.seek(start)
                while length > 0 and (chunk := f.read(min(length, 1 << 23))):
                    h.update(chunk)
                    length -= len(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def shapes_digest(named_shapes: Iterable[tuple[str, Any]]) -> str:
    """A digest of parameter names and shapes (name order does not matter)."""
    lines = sorted(f"{name}:{tuple(int(d) for d in shape)}" for name, shape in named_shapes)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def of_run(cfg: Config, params: str) -> dict:
    """This run's provenance, with `params` its model's shapes_digest (plain types: state.pt and meta.json hold it)."""
    return {"format": FORMAT, "stage": cfg.run.stage, "model": cfg.model.path, "params": params,
            "config": math_config(cfg), "data": [file_fingerprint(f) for f in training_files(cfg)]}


# ----------------------------------------------------------------------------------------------- comparing
def differences(saved: dict, here: dict) -> list[tuple[str, str]]:
    """(what, message) of every difference between a checkpoint's provenance and this run's, stage first."""
    out = []
    if saved.get("stage") != here["stage"]:
        out.append(("stage", f"it was written by stage {saved.get('stage')}, this run is {here['stage']}"))
    if saved.get("model") != here["model"]:
        out.append(("model", f"model.path: {saved.get('model')} there, {here['model']} here"))
    elif saved.get("params", here["params"]) != here["params"]:
        out.append(("params", "the model's parameter names or shapes differ (another model.tiny or model files)"))
    there_cfg = saved.get("config", {})
    for key, value in here["config"].items():  # keys only one version knows are not compared
        if key in there_cfg and there_cfg[key] != value:
            out.append((key, f"{key}: {_show(there_cfg[key])} there, {_show(value)} here"))
    out.extend(_data_differences(saved.get("data", here["data"]), here["data"]))
    return out


def _data_differences(there: list[dict], here: list[dict]) -> list[tuple[str, str]]:
    if len(there) != len(here):
        return [("data", f"training data: {len(there)} file(s) there ({', '.join(d['path'] for d in there)}), "
                         f"{len(here)} here ({', '.join(d['path'] for d in here)})")]
    out = []
    for old, new in zip(there, here):
        if old.get("sha256") == new.get("sha256") and (old.get("sha256") or old["path"] == new["path"]):
            continue  # same content (a moved or touched file is the same data)
        if old["path"] == new["path"]:
            what = f"data file {new['path']} changed since the checkpoint"
        else:
            what = f"data file {old['path']} there, {new['path']} here, with other content"
        out.append(("data", f"{what} (sha256 {str(old.get('sha256'))[:12]} there, {str(new.get('sha256'))[:12]} "
                            f"here; {old.get('bytes')} bytes there, {new.get('bytes')} here)"))
    return out


def _show(value) -> str:
    return json.dumps(value)


def verify(path: Path, saved: dict | None, here: dict | None, resume, is_main: bool,
           check_shapes: Callable[[], None] | None = None) -> None:
    """Collective: refuse (CheckpointError on every rank) or accept resuming from checkpoint `path` whose recorded
    provenance is `saved`; `here` is this run's (read on rank 0 only). A checkpoint of another stage is named as such
    before check_shapes (the backend's own, detailed check of the model's tensors) runs; resume="force" warns."""
    found = differences(saved, here) if is_main and saved is not None and here is not None else None
    found = broadcast_object(found if is_main else None)
    if found is None:
        if is_main and saved is None:
            log.warning("%s records no provenance (written by an older nova_rt): resuming without checking that it "
                        "was written by this stage, model, data and config", path)
        if check_shapes is not None:
            check_shapes()
        return
    if resume != "force" and found[:1] and found[0][0] == "stage":
        raise CheckpointError(_refusal(path, found[:1]))
    if check_shapes is not None:
        check_shapes()
    if not found:
        return
    if resume != "force":
        raise CheckpointError(_refusal(path, found))
    if is_main:
        log.warning("checkpoint.resume=force: resuming from %s although %s", path, "; ".join(m for _, m in found))


def _refusal(path: Path, found: list) -> str:
    shown = [m for _, m in found[:4]] + ([f"and {len(found) - 4} more"] if len(found) > 4 else [])
    return (f"{path} cannot be resumed by this run: {'; '.join(shown)}. Start it in another run.dir, or set "
            "checkpoint.resume=force to resume anyway")


# ----------------------------------------------------------------------------------------------- config.json
def has_checkpoints(run_dir: Path) -> bool:
    """Whether run_dir/checkpoints holds a step directory (either backend's layout)."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir())


def write_config(cfg: Config, run_dir: Path) -> None:
    """run_dir/config.json: this run's resolved config (temporary name, then renamed)."""
    tmp = Path(run_dir) / "config.json.tmp"
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    tmp.replace(Path(run_dir) / "config.json")
