"""mergekit-style YAML for `nova-rt merge`: parsing, validation, and per-tensor parameter resolution.

Accepted (mergekit's meaning): merge_method, base_model, models[].model, models[].parameters, parameters, dtype,
out_dtype, tokenizer_source (a model path or "base"). A parameter value is a scalar, or a list of
{filter: SUBSTRING, value: SCALAR} entries where the first filter contained in the tensor name (or "*" / no
filter) wins. Everything else (slices, modules, tokenizer, chat_template, gradients, "union" tokenizers, unknown
keys or parameters) is an error naming the field. Model paths are local HF directories; relative paths resolve
against the YAML file's directory. Per-model parameters may also be set globally (as defaults for every model).
A model may be a PEFT LoRA adapter directory (nova_rt.merge.adapter), `ADAPTER` or mergekit's `BASE+ADAPTER`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import nova_rt.merge.methods  # noqa: F401 - registers the built-in methods that get_merge looks up
from nova_rt.errors import MergeConfigError
from nova_rt.merge.adapter import is_adapter_dir, read_adapter_config, resolve_adapter_base
from nova_rt.merge.registry import REQUIRED, MergeMethod, ParamSpec, get_merge

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64}
_TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_UNSUPPORTED = {"slices": "use `models:` (layer slicing is not supported)", "modules": "use `models:`",
                "tokenizer": "tokenizer surgery is not supported; use tokenizer_source",
                "chat_template": "copy the template into the tokenizer source instead"}


@dataclass(kw_only=True, slots=True)
class ModelEntry:
    path: Path
    """Resolved local HF directory."""
    label: str
    """The path as written in the YAML, for messages."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Per-model parameter settings (validated, unresolved)."""
    adapter_base: Path | None = None
    """For a PEFT LoRA adapter directory (`path`): the full model it applies to; None for a full model."""


@dataclass(kw_only=True, slots=True)
class MergeConfig:
    method: MergeMethod
    base: ModelEntry | None
    """The base model (None for methods without one)."""
    models: list[ModelEntry]
    """Models merged besides the base (for base-less methods: all models), in config order."""
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    """Inputs are cast to this dtype before merging (mergekit's `dtype`); also the default output dtype."""
    out_dtype: torch.dtype | None = None
    tokenizer_source: Path | None = None
    source_text: str = ""
    """The YAML as given, written next to the merged model for provenance."""

    def resolve(self, tensor_name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(global params, per-model params) for one tensor, defaults filled in."""
        m = self.method
        glob = {k: _resolve(self.parameters.get(k, spec.default), tensor_name, k, spec)
                for k, spec in m.global_params.items()}
        per_model = []
        for entry in self.models:
            vals = {}
            for k, spec in m.model_params.items():
                setting = entry.parameters.get(k, self.parameters.get(k, spec.default))
                vals[k] = _resolve(setting, tensor_name, k, spec, entry.label)
            per_model.append(vals)
        return glob, per_model


def _resolve(setting: Any, tensor_name: str, key: str, spec: ParamSpec, label: str = "") -> Any:
    if isinstance(setting, list):
        for cond in setting:
            filt = cond.get("filter")
            if filt is None or filt == "*" or filt in tensor_name:
                return cond["value"]
        setting = spec.default
    if setting is REQUIRED:
        who = f" for model {label}" if label else ""
        raise MergeConfigError(f"parameter {key!r}{who} has no value for tensor {tensor_name!r} (no filter matched)")
    return setting


def _validate_setting(key: str, value: Any, spec: ParamSpec, where: str) -> Any:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if value and all(not isinstance(v, dict) for v in value):
            raise MergeConfigError(f"{where}: parameter {key!r} is a list of values (a gradient across layers); "
                                   "gradients are not supported, use a scalar or filter/value entries")
        out = []
        for cond in value:
            extra = set(cond) - {"filter", "value"} if isinstance(cond, dict) else {"<not a mapping>"}
            if extra or "value" not in cond:
                raise MergeConfigError(f"{where}: parameter {key!r}: each entry needs `value` (and optionally "
                                       f"`filter`), got {cond!r}")
            out.append({"filter": cond.get("filter"), "value": _validate_setting(key, cond["value"], spec, where)})
        return out
    try:
        return spec.validate(key, value, where)
    except ValueError as exc:
        raise MergeConfigError(str(exc)) from None


def _check_params(params: Any, allowed: dict[str, ParamSpec], method: MergeMethod, where: str,
                  per_model: bool) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeConfigError(f"{where}: `parameters` must be a mapping, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        if key not in allowed:
            if per_model and key in method.global_params:
                raise MergeConfigError(f"{where}: parameter {key!r} is global for {method.name}; set it under the "
                                       "top-level `parameters`")
            supported = sorted(set(method.global_params) | set(method.model_params))
            raise MergeConfigError(f"{where}: unknown parameter {key!r} for merge_method {method.name} "
                                   f"(supported: {', '.join(supported) or 'none'})")
        out[key] = _validate_setting(key, value, allowed[key], where)
    return out


def _model_path(value: Any, root: Path, where: str) -> tuple[Path, str]:
    if isinstance(value, dict):
        raise MergeConfigError(f"{where}: model must be a local directory path string (hub references are not "
                               "supported; a LoRA adapter is its directory or BASE+ADAPTER)")
    if not isinstance(value, str) or not value:
        raise MergeConfigError(f"{where}: model must be a local directory path, got {value!r}")
    path = (root / value).resolve() if not Path(value).is_absolute() else Path(value).resolve()
    if not path.is_dir():
        raise MergeConfigError(f"{where}: model {value!r} resolves to {path}, which is not a directory "
                               "(nova-rt merge reads local HF directories only)")
    return path, value


def _model_ref(value: Any, root: Path, where: str) -> ModelEntry:
    """A model field: a full model or adapter directory, or mergekit's `BASE+ADAPTER` (split at the `+` where both
    sides are directories, unless the whole value is one)."""
    if isinstance(value, str) and "+" in value and not _resolve_dir(value, root).is_dir():
        for index in [i for i, char in enumerate(value) if char == "+"]:
            base, adapter = value[:index], value[index + 1:]
            if base and adapter and _resolve_dir(base, root).is_dir() and _resolve_dir(adapter, root).is_dir():
                base_path = _model_path(base, root, where)[0]
                if is_adapter_dir(base_path):
                    raise MergeConfigError(f"{where}: {value!r}: the base {base!r} is a PEFT adapter directory; "
                                           "BASE+ADAPTER needs a full model before the `+`")
                path = _model_path(adapter, root, where)[0]
                if not is_adapter_dir(path):
                    raise MergeConfigError(f"{where}: {value!r}: {adapter!r} is no PEFT adapter directory (no "
                                           "adapter_config.json / adapter_model.safetensors)")
                read_adapter_config(path, where)
                return ModelEntry(path=path, label=value, adapter_base=base_path)
    path, label = _model_path(value, root, where)
    return ModelEntry(path=path, label=label)


def _resolve_dir(value: str, root: Path) -> Path:
    return Path(value) if Path(value).is_absolute() else root / value


def _resolve_adapters(base: ModelEntry | None, models: list[ModelEntry], root: Path, where: dict[int, str]) -> None:
    """Fill in adapter_base for adapter models whose YAML names no base (nova_rt.merge.adapter.resolve_adapter_base):
    the base_model's first (its own base when it is an adapter), then each model's against the base's full model."""
    if base is not None and base.adapter_base is None and is_adapter_dir(base.path):
        base.adapter_base = resolve_adapter_base(base.path, base.label, "base_model", root, None, "")
    full, full_label = (None, "") if base is None else \
        (base.adapter_base, str(base.adapter_base)) if base.adapter_base is not None else (base.path, base.label)
    for entry in models:
        if entry.adapter_base is None and is_adapter_dir(entry.path):
            entry.adapter_base = resolve_adapter_base(entry.path, entry.label, where[id(entry)], root, full, full_label)


def _dtype(raw: dict, key: str) -> torch.dtype | None:
    name = raw.get(key)
    if name is None:
        return None
    if name not in DTYPES:
        raise MergeConfigError(f"{key}: unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


def _check_top_level(raw: Any) -> MergeMethod:
    if not isinstance(raw, dict):
        raise MergeConfigError(f"merge config must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key in _UNSUPPORTED:
            raise MergeConfigError(f"field {key!r} is not supported by nova-rt merge: {_UNSUPPORTED[key]}")
        if key not in _TOP_LEVEL:
            raise MergeConfigError(f"unknown field {key!r} (supported: {', '.join(sorted(_TOP_LEVEL))})")
    if "merge_method" not in raw:
        raise MergeConfigError("missing field 'merge_method'")
    try:
        return get_merge(raw["merge_method"])
    except ValueError as exc:
        raise MergeConfigError(f"merge_method: {exc}") from None


def _split_base(method: MergeMethod, raw: dict, entries: list[ModelEntry], root: Path):
    if not method.needs_base or (method.optional_base and raw.get("base_model") is None):
        if raw.get("base_model") is not None:
            raise MergeConfigError(f"base_model: {method.name} does not use a base model; list it under models")
        return None, entries
    if raw.get("base_model") is None:
        raise MergeConfigError(f"base_model: required by merge_method {method.name}")
    base = _model_ref(raw["base_model"], root, "base_model")
    others = []
    for entry in entries:
        if entry.path == base.path and entry.adapter_base == base.adapter_base:
            if entry.parameters:
                raise MergeConfigError(f"models: parameters on the base model {entry.label} have no effect with "
                                       f"{method.name}; remove them")
            continue
        others.append(entry)
    return base, others


def parse_config(raw: Any, root: Path, source_text: str = "") -> MergeConfig:
    """Validate a loaded YAML mapping; relative model paths resolve against `root`."""
    method = _check_top_level(raw)
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeConfigError("models: a non-empty list of {model: PATH, parameters: {...}} is required")
    entries = []
    for i, item in enumerate(models_raw):
        where = f"models[{i}]"
        if not isinstance(item, dict) or "model" not in item:
            raise MergeConfigError(f"{where}: each entry needs a `model` path")
        for key in item:
            if key not in ("model", "parameters"):
                raise MergeConfigError(f"{where}: unknown field {key!r} (supported: model, parameters)")
        entry = _model_ref(item["model"], root, where)
        entry.parameters = _check_params(item.get("parameters"), method.model_params, method,
                                         f"{where} ({entry.label})", True)
        entries.append(entry)
    seen = {}
    for e in entries:
        if (e.path, e.adapter_base) in seen:
            raise MergeConfigError(f"models: {e.label} and {seen[e.path, e.adapter_base]} are the same directory "
                                   f"{e.path}")
        seen[e.path, e.adapter_base] = e.label
    base, models = _split_base(method, raw, entries, root)
    _resolve_adapters(base, models, root, {id(entry): f"models[{i}]" for i, entry in enumerate(entries)})
    n = len(models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = f"exactly {method.min_models}" if method.min_models == method.max_models else \
            f"at least {method.min_models}"
        what = "models besides the base" if method.needs_base else "models"
        raise MergeConfigError(f"models: {method.name} needs {want} {what}, got {n}")
    allowed = {**method.model_params, **method.global_params}
    params = _check_params(raw.get("parameters"), allowed, method, "parameters", False)
    for k, spec in method.global_params.items():
        if spec.default is REQUIRED and k not in params:
            raise MergeConfigError(f"parameters: {method.name} requires parameter {k!r}")
    for k, spec in method.model_params.items():
        for e in models:
            if spec.default is REQUIRED and k not in e.parameters and k not in params:
                raise MergeConfigError(f"models ({e.label}): {method.name} requires parameter {k!r}")
    return MergeConfig(method=method, base=base, models=models, parameters=params, dtype=_dtype(raw, "dtype"),
                       out_dtype=_dtype(raw, "out_dtype"), tokenizer_source=_tokenizer_source(raw, base, root),
                       source_text=source_text)


def _tokenizer_source(raw: dict, base: ModelEntry | None, root: Path) -> Path | None:
    src = raw.get("tokenizer_source")
    if src is None:
        return None
    if src == "union":
        raise MergeConfigError("tokenizer_source: 'union' (vocabulary merging) is not supported")
    if src == "base":
        if base is None:
            raise MergeConfigError("tokenizer_source: 'base' needs a base_model")
        return base.path
    return _model_path(src, root, "tokenizer_source")[0]


def load_config(config: str | Path | dict) -> MergeConfig:
    """A MergeConfig from a YAML path, YAML text already parsed into a dict (paths relative to the CWD)."""
    if isinstance(config, dict):
        return parse_config(config, Path.cwd(), yaml.safe_dump(config, sort_keys=False))
    path = Path(config)
    if not path.is_file():
        raise MergeConfigError(f"merge config {path} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"{path}: invalid YAML: {exc}") from None
    return parse_config(raw, path.resolve().parent, text)
