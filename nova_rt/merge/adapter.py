"""PEFT LoRA adapter directories as merge inputs: each reads as its base model plus scale * B @ A, tensor by tensor.

An adapter directory (adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes it) names
its base in base_model_name_or_path; config.py decides which full model that is (docs/lora.md#merging-lora-experts).
AdapterReader has ModelReader's interface, so the engine streams it like any model: `view(name)` is the base's
zero-copy view for a tensor the adapter does not touch, the adapter's tensor (cast to the base's dtype) for a
modules_to_save or other full tensor, and for an adapted linear layer W + scale * B @ A computed on the fly as peft's
merge does it (delta in the adapter's dtype, the product in fp32 for half-precision adapters; added to W in one
rounding to W's dtype); no merged expert is written to disk. scale = lora_alpha / r, or lora_alpha / sqrt(r) with
use_rslora; alpha_pattern overrides lora_alpha per module as in peft; fan_in_fan_out transposes B @ A (GPT-2's
Conv1D). lora_B biases (lora_bias) add scale * bias to the base bias. DoRA and embedding LoRA are refused. Every
adapter tensor is checked against the base when the reader opens (MergeConfigError, exit 2, naming the adapter file
and the first offending tensor): a module the base lacks, mismatched in/out features or rank, a lone A or B.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nova_rt.errors import MergeConfigError
from nova_rt.merge.st_io import (
    _MADV_DONTNEED,
    ModelReader,
    TensorInfo,
    _advise,
    _MappedFile,
    _prefetch_pages,
    _read_header,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter_dir(path: Path) -> bool:
    """A directory holding any of a PEFT adapter's files (complete or not: read_adapter_config says what is
    missing)."""
    return any((Path(path) / name).exists() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin"))


def read_adapter_config(path: Path, where: str) -> dict:
    """adapter_config.json of a LoRA adapter directory whose weights are in safetensors, else MergeConfigError."""
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise MergeConfigError(f"{where}: {config_file} is missing ({path} holds adapter weights but is no complete "
                               "PEFT adapter directory)")
    if not weights.is_file():
        old = " (adapter_model.bin is not read: re-save the adapter with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise MergeConfigError(f"{where}: {weights} is missing{old}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeConfigError(f"{where}: {config_file}: invalid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise MergeConfigError(f"{where}: {config_file}: peft_type {kind!r}: only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise MergeConfigError(f"{where}: {config_file}: use_dora: DoRA adapters cannot be merged yet")
    return config


def resolve_adapter_base(path: Path, label: str, where: str, root: Path, merge_base: Path | None,
                         merge_base_label: str) -> Path:
    """The full model the adapter at `path` applies to when the YAML names none (`model: BASE+ADAPTER` names one):
    its base_model_name_or_path must be the merge's base model (the same string as the YAML's base_model or the same
    directory, relative paths resolving against `root`); without a merge base it must be a local model directory."""
    config = read_adapter_config(path, where)
    name = config.get("base_model_name_or_path")
    local = None
    if isinstance(name, str) and name:
        candidate = Path(name) if Path(name).is_absolute() else root / name
        if candidate.is_dir() and not is_adapter_dir(candidate):
            local = candidate.resolve()
    if merge_base is not None:
        if local == merge_base or name == merge_base_label:
            return merge_base
        resolved = f" ({merge_base})" if merge_base_label != str(merge_base) else ""
        raise MergeConfigError(f"{where}: {path / ADAPTER_CONFIG}: base_model_name_or_path {name!r} is not the merge's "
                               f"base model {merge_base_label!r}{resolved}; if the adapter was trained on that model, "
                               f"write `model: {merge_base_label}+{label}`")
    if local is None:
        raise MergeConfigError(f"{where}: {path / ADAPTER_CONFIG}: base_model_name_or_path {name!r} is not a local "
                               f"model directory; write `model: BASE+{label}` with its base model's directory")
    return local


def _alpha(config: dict, module: str) -> float:
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # peft's get_pattern_key
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(config.get("lora_alpha", 8))


@dataclass(frozen=True)
class _Lora:
    a: str  # adapter tensor names
    b: str
    scale: float


class AdapterReader:
    """A LoRA adapter over its base model, with ModelReader's interface (path, label, config and tensors are the
    base's: the adapter changes values, never names, shapes or dtypes)."""

    def __init__(self, path: Path, base: Path, label: str | None = None):
        self.adapter_path, self.label = Path(path), label or str(path)
        self.adapter_config = read_adapter_config(self.adapter_path, self.label)
        self.file = self.adapter_path / ADAPTER_WEIGHTS
        self._base = ModelReader(base, f"{self.label} (base model {base})")
        self.path, self.config, self.tensors = self._base.path, self._base.config, self._base.tensors
        try:
            self.adapter = _read_header(self.file)
            self._lora, self._replaced = self._index()
            self._map = _MappedFile(self.file, self.file.stat().st_size)
        except BaseException:
            self._base.close()
            raise

    def _fail(self, key: str, why: str) -> MergeConfigError:
        return MergeConfigError(f"{self.label}: {self.file}: tensor {key!r} {why}")

    def _index(self) -> tuple[dict[str, _Lora | str], dict[str, str]]:
        """{base tensor: its LoRA factors (weights) or its lora_B bias (biases)}, {base tensor: adapter tensor that
        replaces it}, every adapter tensor checked against the base in file order."""
        fan_in_fan_out = bool(self.adapter_config.get("fan_in_fan_out"))
        rslora = bool(self.adapter_config.get("use_rslora"))
        lora: dict[str, _Lora | str] = {}
        replaced: dict[str, str] = {}
        for info in sorted(self.adapter.values(), key=lambda tensor: tensor.offset):
            key = info.name
            name = key.removeprefix(_PREFIX)
            if "lora_embedding_" in name or "lora_magnitude_vector" in name:
                raise self._fail(key, "is an embedding-LoRA or DoRA tensor, which cannot be merged yet")
            if ".lora_B." in name and name.endswith(".bias"):
                target = name.split(".lora_B.")[0] + ".bias"
                self._check_target(key, target, info)
                lora[target] = key
                continue
            if ".lora_B." in name:
                continue  # checked with its A
            if ".lora_A." not in name:
                self._check_target(key, name, info)
                replaced[name] = key
                continue
            module, suffix = name.split(".lora_A.")
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in self.adapter:
                raise self._fail(key, f"has no {b_key!r} beside it")
            a_info, b_info = info, self.adapter[b_key]
            target = f"{module}.{suffix}"
            if target not in self.tensors:
                raise self._fail(key, f"adapts {target!r}, which the base model {self._base.path} does not have")
            base_shape = self.tensors[target].shape
            out_features, in_features = base_shape[::-1] if fan_in_fan_out else base_shape if len(base_shape) == 2 \
                else (None, None)
            if len(a_info.shape) != 2 or len(b_info.shape) != 2:
                raise self._fail(key, f"has shape {list(a_info.shape)} (with {b_key!r} {list(b_info.shape)}): "
                                      "only LoRA on linear layers (2-D A and B) can be merged")
            if a_info.shape[1] != in_features:
                raise self._fail(key, f"has in_features {a_info.shape[1]} but the base model's {target!r} is "
                                      f"{list(base_shape)} (in_features {in_features}) in {self._base.path}")
            if b_info.shape[0] != out_features:
                raise self._fail(b_key, f"has out_features {b_info.shape[0]} but the base model's {target!r} is "
                                        f"{list(base_shape)} (out_features {out_features}) in {self._base.path}")
            rank = a_info.shape[0]
            if b_info.shape[1] != rank:
                raise self._fail(b_key, f"has rank {b_info.shape[1]} but {key!r} has rank {rank}")
            alpha = _alpha(self.adapter_config, module)
            lora[target] = _Lora(key, b_key, alpha / math.sqrt(rank) if rslora else alpha / rank)
        for target, factors in lora.items():
            if target in replaced:
                raise self._fail(replaced[target], f"replaces {target!r}, which LoRA tensors adapt too")
            if isinstance(factors, str) and not isinstance(lora.get(target.removesuffix(".bias") + ".weight"), _Lora):
                raise self._fail(factors, "is a lora_B bias without lora_A / lora_B weights for its layer")
        return lora, replaced

    def _check_target(self, key: str, target: str, info: TensorInfo) -> None:
        base = self.tensors.get(target)
        if base is None:
            raise self._fail(key, f"is {target!r} of the model, which the base model {self._base.path} does not have")
        if base.shape != info.shape:
            raise self._fail(key, f"has shape {list(info.shape)} but the base model's {target!r} is "
                                  f"{list(base.shape)} in {self._base.path}")

    def _adapter_view(self, key: str) -> torch.Tensor:
        info = self.adapter[key]
        tensor = self._map.tensor(info.offset, info.nbytes, info.dtype, info.shape)
        if tensor is None:  # misaligned for its dtype: a copy
            with open(self.file, "rb") as handle:
                handle.seek(info.offset)
                raw = bytearray(handle.read(info.nbytes))
            tensor = torch.frombuffer(raw, dtype=torch.uint8).view(info.dtype).reshape(info.shape)
        return tensor

    def _adapter_keys(self, name: str) -> list[str]:
        if name in self._replaced:
            return [self._replaced[name]]
        entry = self._lora.get(name)
        return [] if entry is None else [entry] if isinstance(entry, str) else [entry.a, entry.b]

    def view(self, name: str) -> torch.Tensor:
        """The tensor `name` of base + adapter: a zero-copy base view where the adapter does not touch it."""
        if name in self._replaced:
            return self._adapter_view(self._replaced[name]).to(self.tensors[name].dtype)
        base = self._base.view(name)
        entry = self._lora.get(name)
        if entry is None:
            return base
        if isinstance(entry, str):  # lora_B's bias: base bias + scale * bias (peft's lora_bias merge)
            factors = self._lora[name.removesuffix(".bias") + ".weight"]
            delta = self._adapter_view(entry) * factors.scale
        else:
            a, b = self._adapter_view(entry.a), self._adapter_view(entry.b)
            half = b.dtype in (torch.float16, torch.bfloat16)
            delta = b.float() @ a.float() if half else b @ a
            if self.adapter_config.get("fan_in_fan_out"):
                delta = delta.T
            delta = (delta * entry.scale).to(b.dtype)
        return (base.to(torch.promote_types(base.dtype, delta.dtype)) + delta).to(base.dtype)

    def prefetch(self, name: str) -> None:
        if name not in self._replaced:
            self._base.prefetch(name)
        for key in self._adapter_keys(name):
            info = self.adapter[key]
            _prefetch_pages(self._map.addr + info.offset, info.nbytes)

    def release(self, name: str) -> None:
        self._base.release(name)
        for key in self._adapter_keys(name):
            info = self.adapter[key]
            _advise(self._map.addr + info.offset, info.nbytes, _MADV_DONTNEED)

    def close(self) -> None:
        self._base.close()
        self._map.close()


def open_reader(entry) -> ModelReader | AdapterReader:
    """The reader of a merge config's ModelEntry: its adapter over its base, or the full model."""
    if getattr(entry, "adapter_base", None) is not None:
        return AdapterReader(entry.path, entry.adapter_base, entry.label)
    return ModelReader(entry.path, entry.label)
