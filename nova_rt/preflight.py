"""Checks of the user's files that run before any model or data loads, so a mistake is one clear line naming the
file instead of a traceback from deep inside transformers or safetensors (which name no path).

A local model directory needs config.json and weights; every *.safetensors file in it must have a readable header
whose tensors exactly fill the file (a truncated copy or a file of garbage fails here). Data files of the supervised
stages must exist. `builtin:NAME` must name a bundled model, `tiny:ARCH` with `model.tiny` must build a config, and
`model.attn_impl: flash_attention_2` needs flash-attn and a GPU.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from nova_rt.config import Config, resolve_path
from nova_rt.errors import ConfigError, UserError
from nova_rt.output_paths import check_output_disjoint

_DATA_STAGES = ("sft", "rm", "dpo")
# What each stage writes, replaces or deletes directly under run.dir (glob patterns of the top-level entries): the
# trainers' final/ (replaced; final_merged/ too with lora.merge_final), checkpoints/ (pruned), logs, evals, the run
# lock and DPO's reference cache; the PAS stage's pas/ and pas_model/ (its SFT run); the pipeline's stage directories
# (checkpoints pruned by rglob), report.
_TRAIN_WRITES = ("final", ".final.*", "final_merged", ".final_merged.*", "checkpoints", "tensorboard", "metrics.jsonl",
                 "config.json", "loss.png", "*.tmp", ".lock", "ref_logps_*.pt", "eval_initial.json", "eval_final.json")
RUN_DIR_WRITES = {"sft": _TRAIN_WRITES, "rm": _TRAIN_WRITES, "dpo": _TRAIN_WRITES, "grpo": _TRAIN_WRITES,
                  "pas": ("pas", "pas_model", ".lock"),
                  "pipeline": ("config.json", "*.tmp", ".lock", "base_model", "pas", "sft", "merge", "rm", "grpo",
                               "report.md", "plots")}


def check_safetensors(path: Path) -> None:
    """UserError naming `path` unless it is a complete safetensors file (header parsed, sizes consistent)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file ({size} bytes; truncated?)")
        (header_length,) = struct.unpack("<Q", head)
        if header_length > size - 8:
            raise UserError(f"{path}: not a safetensors file (header length {header_length} exceeds the {size}-byte "
                            "file; truncated or not safetensors)")
        try:
            header = json.loads(f.read(header_length))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (unreadable header)")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    need = 8 + header_length + max(ends, default=0)
    if need != size:
        raise UserError(f"{path}: the header describes {need} bytes but the file has {size} "
                        f"({'truncated' if size < need else 'trailing data'}); copy the file again")


def check_model_dir(path: str, key: str = "model.path") -> None:
    """A local HF model directory: config.json present, weights present and complete."""
    if not path or ":" in path.split("/")[0]:
        return
    directory = Path(path)
    if not directory.exists():
        raise UserError(f"{key}: {path}: no such directory (give a local HF model directory, builtin:NAME or "
                        "tiny:llama|qwen2)")
    if not directory.is_dir():
        raise UserError(f"{key}: {path}: not a directory (give the HF model directory, not a file in it)")
    if not (directory / "config.json").is_file():
        raise UserError(f"{key}: {path}: no config.json, so not an HF model directory (it must hold config.json "
                        "and the *.safetensors weights, as save_pretrained writes them)")
    shards = sorted(directory.glob("*.safetensors"))
    if not shards and not any(directory.glob("pytorch_model*.bin")):
        raise UserError(f"{key}: {path}: no *.safetensors (or pytorch_model*.bin) weights")
    for shard in shards:
        try:
            check_safetensors(shard)
        except UserError as exc:
            raise UserError(f"{key}: {exc}") from None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: unreadable index (no weight_map)") from None
        missing = sorted(name for name in names if not (directory / name).is_file())
        if missing:
            raise UserError(f"{index}: lists {missing[0]}, which is not in {path}")


def check_model_spec(path: str, tiny: dict, attn_impl: str) -> None:
    """builtin:/tiny: names and model.tiny sizes that transformers would reject with a traceback; attention."""
    import importlib.util

    if path.startswith("builtin:"):
        from nova_rt.models.loading import BUILTIN_MODELS

        if path.split(":", 1)[1] not in BUILTIN_MODELS:
            raise UserError(f"model.path: unknown builtin model {path!r} (known: "
                            f"{', '.join('builtin:' + name for name in BUILTIN_MODELS)})")
    elif path.startswith("tiny:"):
        from nova_rt.models.tiny import tiny_config

        try:
            tiny_config(path.split(":", 1)[1], **tiny)
        except Exception as exc:  # noqa: BLE001 - TypeError / ValueError / transformers' validation errors
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise UserError(f"model.path {path!r} with model.tiny {tiny}: {' '.join(lines[:2])}") from None
    if attn_impl == "flash_attention_2":
        import torch

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise UserError("model.attn_impl: flash_attention_2 needs the flash-attn package and a CUDA GPU "
                            "(use auto: nova's packed attention)")


def check_inputs(cfg: Config) -> None:
    """Everything above for cfg.model and the data files of the supervised stages; messages start with the
    config file."""
    try:
        _check_inputs(cfg)
    except UserError as exc:
        raise UserError(f"{cfg.source}: {exc}") from None


def _check_inputs(cfg: Config) -> None:
    check_model_spec(cfg.model.path, cfg.model.tiny, cfg.model.attn_impl)
    if cfg.parallel.backend == "megatron" and cfg.model.path.startswith("tiny:"):
        raise UserError(f"model.path: {cfg.model.path!r} is built in memory for parallel.backend: hf; the megatron "
                        "backend loads an HF checkpoint directory (write a tiny one with nova_rt.models.tiny."
                        "save_tiny_model(dir, 'llama'))")
    check_model_dir(resolve_path(cfg, cfg.model.path))
    check_model_positions(cfg)
    tok = resolve_path(cfg, cfg.model.tokenizer)
    if tok and ":" not in tok.split("/")[0] and not Path(tok).is_dir():
        raise UserError(f"model.tokenizer: {tok}: no such directory")
    files = {}
    if cfg.run.stage in _DATA_STAGES:
        files = {f"data.{name}": getattr(cfg.data, name) for name in ("train_files", "eval_files")}
    elif cfg.run.stage == "grpo":
        grpo = cfg.grpo
        files = {"grpo.data.prompt_files": grpo.data.prompt_files, "grpo.data.eval_files": grpo.data.eval_files,
                 "grpo.ptx.files": grpo.ptx.files}
    for key, paths in files.items():
        for i, path in enumerate(paths):
            resolved = resolve_path(cfg, path)
            if not Path(resolved).exists():
                raise UserError(f"{key}[{i}]: {resolved}: no such file or directory")
    check_run_dir_disjoint(cfg)


def stage_inputs(cfg: Config, stage: str) -> dict[str, str]:
    """{config key -> path} of the files and directories `stage` reads (resolved as the stage resolves them)."""
    keys: dict[str, str | list[str]] = {"model.path": cfg.model.path, "model.tokenizer": cfg.model.tokenizer}
    if stage in (*_DATA_STAGES, "pipeline"):
        keys.update({"data.train_files": cfg.data.train_files, "data.eval_files": cfg.data.eval_files})
    if stage == "grpo":
        grpo = cfg.grpo
        keys.update({"grpo.data.prompt_files": grpo.data.prompt_files, "grpo.data.eval_files": grpo.data.eval_files,
                     "grpo.ptx.files": grpo.ptx.files, "grpo.ref_model": grpo.ref_model, "grpo.data.pas_model":
                     grpo.data.pas_model})
        keys.update({f"grpo.rewards[{i}].path": reward["path"] for i, reward in enumerate(grpo.rewards)
                     if isinstance(reward, dict) and isinstance(reward.get("path"), str)})
    if stage == "pas":
        keys.update({"pas.input_files": cfg.pas.input_files, "pas.seeds_file": cfg.pas.seeds_file,
                     "pas.generator.model": cfg.pas.generator.model if cfg.pas.generator.client == "hf" else ""})
    if stage == "pipeline":
        for i, sft_slice in enumerate(cfg.pipeline.sft_slices):
            keys.update({f"pipeline.sft_slices[{i}].{field_name}": sft_slice.get(field_name, [])
                         for field_name in ("train_files", "eval_files")})
    out = {"the config file": cfg.source} if Path(cfg.source).is_file() else {}
    for key, value in keys.items():
        items = {key: value} if isinstance(value, str) else {f"{key}[{i}]": entry for i, entry in enumerate(value)}
        out.update({k: resolve_path(cfg, v) for k, v in items.items() if v})
    if stage == "pipeline":  # what each of its stages reads: the same keys, with pipeline.stage_overrides applied
        for sub_stage in cfg.pipeline.stages:
            overrides = cfg.pipeline.stage_overrides.get(sub_stage, {})
            sub = cfg.with_overrides(overrides) if overrides else cfg
            out.update({f"pipeline.stage_overrides.{sub_stage} {k}": v for k, v in stage_inputs(sub, sub_stage).items()
                        if v not in out.values()})
    return out


def check_run_dir_disjoint(cfg: Config) -> None:
    """A stage's run.dir and its inputs are apart (nova_rt.output_paths): run.dir is not an input nor inside one
    (a model directory would get the run's config.json, metrics and final/), and no input lies where the stage writes
    under run.dir (RUN_DIR_WRITES: a rerun replaces final/, prunes checkpoints/, rewrites config.json and
    metrics.jsonl). Other entries of run.dir are never touched, so a data file kept at run.dir/train.jsonl or in
    run.dir/data/ is allowed. The merge stage checks merge.out itself (nova_rt.merge.engine.run_merge)."""
    written = RUN_DIR_WRITES.get(cfg.run.stage)
    if written is not None:
        check_output_disjoint(cfg.run.dir, stage_inputs(cfg, cfg.run.stage), "run.dir", written)


def model_positions(cfg) -> tuple[int, str] | None:
    """(the policy's max_position_embeddings, where it comes from) read without loading weights: a tiny model's
    config, or a local directory's config.json; None when unknown (builtin:, no such field)."""
    path = cfg.model.path
    if path.startswith("tiny:"):
        from nova_rt.models.tiny import tiny_config

        return (tiny_config(path.split(":", 1)[1], **cfg.model.tiny).max_position_embeddings,
                f"model.tiny.max_positions of {path}")
    config_file = Path(resolve_path(cfg, path)) / "config.json"
    if ":" in path.split("/")[0] or not config_file.is_file():
        return None
    try:
        positions = json.loads(config_file.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # the model loader names the unreadable file
    return (positions, f"max_position_embeddings in {config_file}") if isinstance(positions, int) else None


def check_model_positions(cfg) -> None:
    """ConfigError naming the key when a sequence length the run is configured for exceeds the model's positions
    (nova_rt.preflight runs it before the weights load)."""
    stage = cfg.run.stage
    if stage in ("sft", "rm", "dpo", "pipeline"):
        lengths = {"data.max_seq_len": cfg.data.max_seq_len}
    elif stage == "grpo":
        lengths = {"grpo.sampling.max_new_tokens": cfg.grpo.sampling.max_new_tokens}
        if cfg.grpo.ptx.coef > 0:
            lengths["grpo.ptx.max_len"] = cfg.grpo.ptx.max_len
    else:
        return
    known = model_positions(cfg)
    if known is None:
        return
    positions, source = known
    for key, length in lengths.items():
        if length > positions:
            raise ConfigError(f"{key}: {length} exceeds the model's {positions} positions ({source}); use at most "
                              f"{positions}")
