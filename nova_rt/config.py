"""Typed configuration: one small dataclass per component, loaded from YAML with `--set a.b=c` overrides.

A config file is a mapping of sections. The core sections (run, model, data, packing, optim, train, checkpoint,
logging, parallel) are defined here; a stage adds its own section (`grpo`, `dpo`, `pas`, ...) by decorating a
dataclass with `@register_section("<name>")` in `nova_rt/stages/<name>.py` (section name == module name, so the
loader can import it on demand). Defaults live only in the dataclasses; YAML files hold overrides.

Unknown keys, values of the wrong type, choices outside a field's `Literal[...]` and out-of-range numbers are
errors that name the key and the file, raised while loading, before any model or data loads.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nova_rt.backends import backend_names
from nova_rt.config_checks import check_run
from nova_rt.config_paths import relocate_paths
from nova_rt.config_values import _build_section, check_range
from nova_rt.errors import ConfigError

DType = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
"""Parameter dtype names a config accepts (nova_rt.models.loading.DTYPES maps them to torch dtypes)."""

_SECTIONS: dict[str, type] = {}


def register_section(name: str):
    """Register a dataclass as the config section `name` (used by stage modules)."""

    def deco(cls):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"config section {name!r} must be a dataclass")
        _SECTIONS[name] = cls
        return cls

    return deco


# ----------------------------------------------------------------------------------------------- core sections
@register_section("run")
@dataclass(kw_only=True)
class RunConfig:
    stage: Literal["sft", "rm", "dpo", "grpo", "pas", "merge", "pipeline"] = "sft"
    """Which stage runs: sft, rm, dpo, grpo, pas, merge, pipeline."""
    dir: str = "runs/default"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard events, final/ model."""
    seed: int = 0
    """Seeds python, numpy and torch (and the data order)."""


@register_section("model")
@dataclass(kw_only=True)
class ModelConfig:
    path: str = "builtin:smollm2-135m-instruct"
    """A local HF causal-LM directory, `builtin:smollm2-135m-instruct` (converted from the bundled GGUF once and
    cached), or `tiny:llama` / `tiny:qwen2` (random tiny model built from `tiny`)."""
    dtype: DType = "float32"
    """float32, bfloat16 or float16: the dtype the model computes in (autocast), final/ is saved in and frozen models
    (reference, generation copy) are held in. A 16-bit dtype trains with fp32 master weights and fp32 AdamW states
    (see master_weights; float16 adds dynamic loss scaling); table: nova_rt.config.check_precision."""
    master_weights: Literal["fp32", "model_dtype"] = "fp32"
    """Trained parameters and optimizer states: fp32 (the Megatron / torch AMP recipe) or model_dtype (pure 16-bit,
    bfloat16 on the hf backend only: half the memory, but an update below half a bf16 step (~0.4% of the weight)
    rounds away; at lr 1e-5 most weights never move)."""
    attn_impl: Literal["auto", "nova", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto (nova packed attention), nova, sdpa, eager or flash_attention_2."""
    tiny: dict = field(default_factory=dict)
    """Overrides for tiny models: hidden, layers, heads, kv_heads, intermediate, vocab_size, tie."""
    tokenizer: str = ""
    """Tokenizer directory when it differs from `path`."""


@register_section("data")
@dataclass(kw_only=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """jsonl / json / parquet files or `datasets` directories saved with save_to_disk; relative to the config."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files (train_files' formats) SFT, RM and DPO score at step 0, every train.eval_every steps and at the
    end; empty: no eval."""
    eval_max_rows: int = 0
    """Score only the first N usable documents (SFT) or pairs (RM, DPO, the pipeline's held-out scoring) of
    eval_files; 0: all of them."""
    on_error: Literal["error", "skip"] = "error"
    """error: a bad row stops the run naming file, row and field; skip: drop it and count it."""
    max_seq_len: int = 2048
    """Longest sample in tokens."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """truncate or drop samples longer than max_seq_len."""
    system_prompt: str = ""
    """Prepended as a system message when a row has none (empty: none)."""
    shuffle: bool = True
    """Shuffle the rows every epoch (seeded by run.seed and the epoch); false: file order."""

    def validate(self) -> None:
        check_range("data.max_seq_len", self.max_seq_len, ge=1)
        check_range("data.eval_max_rows", self.eval_max_rows, ge=0)


@register_section("packing")
@dataclass(kw_only=True)
class PackingConfig:
    enabled: bool = True
    """SFT: pack several samples into each row of max_tokens slots (best-fit decreasing); false: one sample a row."""
    max_tokens: int = 4096
    """Token slots per packed row."""

    def validate(self) -> None:
        check_range("packing.max_tokens", self.max_tokens, ge=1)


@register_section("optim")
@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    """Peak AdamW learning rate, reached after warmup_steps; the scheduler scales it (nova_rt.lr_schedule)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on weight matrices (biases and norm weights get none)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW [beta1, beta2]: decay rates of the running averages of the gradient and of its square."""
    eps: float = 1e-8
    """AdamW epsilon, added to the square root of the second-moment average (numerical stability)."""
    fused: Literal["auto", "true", "false"] = "auto"
    """auto: fused AdamW on CUDA and CPU (torch's fused kernels), foreach elsewhere; "false": foreach."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """cosine, linear or constant, after warmup."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup (step s uses lr * (s + 1) / warmup_steps); 0: none."""
    min_lr_ratio: float = 0.1
    """cosine and linear decay end at lr * min_lr_ratio at train.max_steps."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""

    def validate(self) -> None:
        check_range("optim.lr", self.lr, ge=0)
        check_range("optim.weight_decay", self.weight_decay, ge=0)
        check_range("optim.eps", self.eps, gt=0)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas: must be two numbers [beta1, beta2], got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", b, ge=0, le=0.999999999)
        check_range("optim.warmup_steps", self.warmup_steps, ge=0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_range("optim.grad_clip", self.grad_clip, ge=0)


@register_section("train")
@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps; the data loader cycles epochs as needed."""
    global_batch: int = 8
    """Packed rows (or samples when packing is off) per optimizer step, over all DP ranks."""
    micro_batch: int = 1
    """Packed rows per forward/backward on one rank."""
    loss_reduction: Literal["token", "sequence"] = "token"
    """token: sum over supervised tokens / their count in the global batch; sequence: mean of per-sample means."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute (autocast) dtype. auto: model.dtype when it is 16-bit, else bf16 on CUDA and fp32 on CPU; fp32: no
    autocast (needs model.dtype float32); bf16: bf16 autocast (model.dtype float32 or bfloat16)."""
    activation_checkpointing: int = 0
    """Checkpoint every k-th decoder layer group of k layers (the report's multi-layer checkpointing); 0 off."""
    num_threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    cpu_allocator: Literal["cached", "system"] = "cached"
    """Runs on CPU: cached (glibc keeps freed large blocks for reuse instead of unmapping them; fewer page faults,
    see nova_rt.cpu_runtime) or system (glibc's defaults)."""
    eval_every: int = 0
    """Held-out eval on data.eval_files (SFT, RM, DPO) every N optimizer steps, besides step 0 and the last step;
    0: only those two."""
    max_nonfinite_steps: int = 3
    """Steps with a non-finite loss or gradient norm are skipped (no update) and counted; this many in a row stop
    the run with an error (see nova_rt.trainer)."""

    def validate(self) -> None:
        check_range("train.max_steps", self.max_steps, ge=1)  # 0 would write an untrained model as "final"
        check_range("train.global_batch", self.global_batch, ge=1)
        check_range("train.micro_batch", self.micro_batch, ge=1)
        check_range("train.activation_checkpointing", self.activation_checkpointing, ge=0)
        check_range("train.num_threads", self.num_threads, ge=0)
        check_range("train.eval_every", self.eval_every, ge=0)
        check_range("train.max_nonfinite_steps", self.max_nonfinite_steps, ge=1)


@register_section("checkpoint")
@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest N complete checkpoints, deleting older ones after each save; 0: keep all."""
    resume: Literal[True, False, "force"] = True
    """Resume from the newest complete checkpoint in run.dir when it was written by this stage, model, data and
    config (nova_rt.provenance; else an error naming what differs); "force": resume anyway, with a warning."""
    save_final: bool = True
    """Write the trained model as an HF directory to run.dir/final."""

    def validate(self) -> None:
        check_range("checkpoint.every", self.every, ge=0)
        check_range("checkpoint.keep_last", self.keep_last, ge=0)


@register_section("logging")
@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    """Also write TensorBoard event files to run.dir/tensorboard (metrics.jsonl is written either way)."""
    progress_bar: bool = True
    """A tqdm bar of optimizer steps on stderr (main rank)."""
    plot: bool = True
    """PNG of the loss curve at the end."""


BackendName = Literal[backend_names()]  # type: ignore[valid-type]  # one per nova_rt/backends/<name>.py: hf, megatron


@register_section("parallel")
@dataclass(kw_only=True)
class ParallelConfig:
    backend: BackendName = "hf"
    """hf (torch DDP/FSDP2 over HF models) or megatron."""
    data_parallel: Literal["ddp", "fsdp2"] = "ddp"
    """ddp or fsdp2 (hf backend)."""
    tensor_parallel: int = 1
    """megatron: tensor-parallel size (TP), splitting attention heads and MLP columns; must divide the head counts
    and intermediate_size. Data-parallel size = world size / (TP * PP * CP)."""
    pipeline_parallel: int = 1
    """megatron: pipeline-parallel size (PP), consecutive layer groups on PP ranks; divides num_hidden_layers."""
    virtual_pipeline_parallel: int = 0
    """megatron: model chunks per pipeline rank for the interleaved 1F1B schedule (needs PP > 2); 0: off."""
    sequence_parallel: bool = False
    """megatron: norms and dropout run on each TP rank's share of the tokens (needs TP >= 2)."""
    context_parallel: int = 1
    """megatron: context-parallel size (CP), each document split over CP ranks with K/V all-gathered; SFT and
    log-probs only."""
    distributed_optimizer: bool = False
    """megatron: its DistributedOptimizer, main params and Adam moments sharded over data-parallel ranks."""

    def validate(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            check_range(f"parallel.{name}", getattr(self, name), ge=1)
        check_range("parallel.virtual_pipeline_parallel", self.virtual_pipeline_parallel, ge=0)


CORE_SECTIONS = ("run", "model", "data", "packing", "optim", "train", "checkpoint", "logging", "parallel")

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_precision(sections: dict, source: str) -> None:
    """ConfigError naming both keys for a contradictory model.dtype / model.master_weights / train.precision.

    model.dtype  train.precision  trained params + AdamW states     compute
    float32      auto             fp32                              bf16 autocast on CUDA, fp32 on CPU
    float32      fp32 / bf16      fp32                              fp32 / bf16 autocast
    bfloat16     auto / bf16      fp32 (master_weights=model_dtype:  bf16 autocast (frozen models: bf16 weights)
                                  bf16, rounding risk)
    float16      auto             fp32, dynamic loss scaling        fp16 autocast
    16-bit       fp32, or the other 16-bit type: error
    parallel.backend=megatron: precision is model.dtype (megatron's bf16/fp16 params with fp32 main params in its
    optimizer); train.precision=bf16 needs model.dtype bfloat16 there, master_weights=model_dtype is refused."""
    model, train, backend = sections["model"], sections["train"], sections["parallel"].backend
    dtype = _DTYPE_NAMES.get(model.dtype, model.dtype)
    keys = f"model.dtype={model.dtype} and train.precision={train.precision}"
    if dtype != "float32" and train.precision == "fp32":
        raise ConfigError(f"{source}: {keys} contradict: fp32 compute needs model.dtype float32 (a 16-bit model.dtype "
                          "computes in it, over fp32 master weights); drop one of them")
    if dtype == "float16" and train.precision == "bf16":
        raise ConfigError(f"{source}: {keys} contradict: a float16 model computes in fp16; use model.dtype bfloat16")
    if backend == "megatron" and train.precision == "bf16" and dtype != "bfloat16":
        raise ConfigError(f"{source}: {keys} contradict on parallel.backend=megatron, which computes in model.dtype "
                          "(no autocast): use model.dtype bfloat16 (fp32 main params stay in its optimizer)")
    if model.master_weights == "model_dtype" and dtype != "float32" and (backend == "megatron" or dtype == "float16"):
        why = ("parallel.backend=megatron (its optimizer always keeps fp32 main params)" if backend == "megatron" else
               f"model.dtype={model.dtype} (fp16 gradients cannot be loss-scaled without an fp32 copy)")
        raise ConfigError(f"{source}: model.master_weights=model_dtype is not supported with {why}; use "
                          "model.master_weights=fp32")


# ----------------------------------------------------------------------------------------------- root object
class Config:
    """All sections of one run. Core sections are always present; stage sections appear on first access."""

    def __init__(self, sections: dict[str, Any], source: str = "<defaults>"):
        self._sections = sections
        self.source = source
        self.config_dir: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        sections = self.__dict__["_sections"]
        if name not in sections:
            cls = _section_class(name, self.__dict__.get("source", "<config>"))
            sections[name] = cls()
        return sections[name]

    def to_dict(self) -> dict:
        return {k: dataclasses.asdict(v) for k, v in self._sections.items()}

    def copy(self) -> Config:
        out = Config({k: dataclasses.replace(v) for k, v in self._sections.items()}, self.source)
        out.config_dir = self.config_dir
        return out

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> Config:
        """A copy with `{"a.b": value}` (or ["a.b=c", ...]) applied and type-checked."""
        raw = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else [_split_override(s) for s in overrides]
        for key, value in items:
            _set_dotted(raw, key, value, "override")
        out = build_config(raw, self.source)
        out.config_dir = self.config_dir
        return out


def _section_class(name: str, source: str) -> type:
    if name not in _SECTIONS:
        try:  # a stage's section lives in nova_rt/stages/<name>.py
            importlib.import_module(f"nova_rt.stages.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nova_rt.stages.{name}":
                raise
    if name not in _SECTIONS:
        known = sorted(set(_SECTIONS) | set(CORE_SECTIONS))
        raise ConfigError(f"{source}: unknown section '{name}' (known: {', '.join(known)})")
    return _SECTIONS[name]


def build_config(raw: dict, source: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    sections = {}
    for name in CORE_SECTIONS:
        sections[name] = _build_section(_SECTIONS[name], raw.get(name) or {}, f"{source}: {name}")
    for name, values in raw.items():
        if name in CORE_SECTIONS:
            continue
        cls = _section_class(name, source)
        sections[name] = _build_section(cls, values or {}, f"{source}: {name}")
    check_precision(sections, source)
    return Config(sections, source)


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=10")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) < 2:
        raise ConfigError(f"{source}: key '{key}' must be section.field (e.g. train.max_steps)")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: '{key}' goes through a non-mapping value")
    node[parts[-1]] = value


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config; `include: other.yaml` (relative) is merged underneath this file's values, its relative
    paths made relative to it (nova_rt.config_paths)."""
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{_chain[-1]}: include cycle: {cycle}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {path}" +
                          (f" (included from {_chain[-1]})" if _chain else "")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = raw.pop("include", None)
    if _chain:  # an included file: its relative paths are relative to it, not to the file including it
        relocate_paths(raw, path.parent)
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: include: expected a file name, got {base!r}")
        merged = load_raw(path.parent / base, (*_chain, path.resolve()))
        _deep_update(merged, raw)
        raw = merged
    return raw


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML file and apply `a.b=c` overrides; errors name the file (or `--set`) and the key."""
    raw = load_raw(path)
    keys = {}
    items = [_split_override(item) for item in overrides or []]
    for item, (key, value) in zip(overrides or [], items):
        _set_dotted(raw, key, value, f"{path} (--set {item})")
        keys[key] = item
    try:
        cfg = build_config(raw, str(path))
        check_run(cfg)
    except ConfigError as exc:
        hit = [item for key, item in keys.items() if f"{key}:" in str(exc) or f"{key}[" in str(exc)]
        if hit:
            raise ConfigError(f"{exc} (from --set {hit[0]})") from None
        raise
    cfg.config_dir = str(Path(path).resolve().parent)
    return cfg


def resolve_path(cfg: Config, p: str) -> str:
    """Resolve a data/model path relative to the config file's directory (absolute paths pass through).

    A relative path is first tried against the current directory, then the config's directory."""
    if not p or ":" in p.split("/")[0] or Path(p).is_absolute() or Path(p).exists():
        return p
    base = getattr(cfg, "config_dir", None) or "."
    cand = Path(base) / p
    return str(cand) if cand.exists() else p
