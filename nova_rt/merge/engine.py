"""Streaming merge of local HF checkpoints: `run_merge(config, out_dir)` behind `nova-rt merge` and the merge stage.

Flow: validate the config; index every input's safetensors headers; plan the output (names, shapes, dtypes) and
check that all inputs agree; then for each output tensor take zero-copy views of it in every (memory-mapped) input,
merge it on `device` straight into its slot in the output staging arena, which is written to the shard with O_DIRECT
in the background (st_io.py, st_writer.py). Another thread faults in tensor k+1's input pages while tensor k is
merged, within a byte budget that keeps the peak near (models + 1) x the largest tensor, never the model size
(a tensor larger than `block_mb` per input is merged in row blocks instead: blocked.py). All goes into a hidden
temporary directory beside OUT_DIR, renamed into place only once complete (an error or interruption leaves no
partial output). OUT_DIR may hold no input and lie in none (nova_rt.output_paths): --force never touches an input.

Tied embeddings: the output config is the base's (else the first model's). If it ties word embeddings and that
model has no `lm_head.weight`, lm_head is not written (the loader ties it to the merged embedding). Otherwise a
model without `lm_head.weight` whose config ties embeddings contributes its input embedding in its place.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nova_rt.merge import ops
from nova_rt.merge.adapter import open_reader
from nova_rt.merge.blocked import BlockReader, block_elements, merge_blocked
from nova_rt.merge.config import MergeConfig, load_config
from nova_rt.merge.methods import BLOCKED_KINDS
from nova_rt.merge.registry import TensorMerge
from nova_rt.merge.st_io import ModelReader, OutTensor, parse_size
from nova_rt.merge.st_writer import ShardedWriter
from nova_rt.output_paths import check_output_disjoint

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), else a no-op. glibc keeps freed multi-MB blocks resident once its dynamic mmap
    threshold has risen, so without a trim per large tensor the RSS drifts to ~2-3x the bytes in flight
    (measured: 90 MiB instead of 35 MiB for 8 MiB tensors x 3 models)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


_TRIM = _malloc_trim()
# Row-block budget per input (MiB). 7B's embed_tokens / lm_head (1.09 GB per model in bf16) run in 256 MiB blocks;
# its largest other tensors (136 MB MLP weights) stay whole. Estimated peak for a 4-model TIES: two blocks per
# input (this one and the prefetched next) + one output block, ~2.3 GiB, plus the interpreter and torch.
DEFAULT_BLOCK_MB = 256
_TRIM_MIN_BYTES = 1 << 20

_TIED = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight")}
_COPY_FILES = ("config.json", "generation_config.json")
_TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "chat_template*", "*.tiktoken", "spiece.model")


@dataclass(frozen=True)
class PlannedTensor:
    out: OutTensor
    sources: tuple[str, ...]  # tensor name to read in each reader (base first when the method has one)
    mergeable: bool  # floating point: merged; otherwise copied from the first reader
    in_nbytes: int  # bytes read for it over all inputs
    block: int = 0  # elements per row block when merged in blocks (blocked.py), 0: whole
    block_nbytes: int = 0  # bytes in flight per block over all inputs and the output (blocked only)

    @property
    def live_nbytes(self) -> int:
        """Bytes of inputs and output one merge step holds: the whole tensor's, or one block's."""
        return self.block_nbytes if self.block else self.in_nbytes + self.out.nbytes


def _ties(reader: ModelReader) -> bool:
    return bool(reader.config.get("tie_word_embeddings", reader.config.get("text_config", {}).get(
        "tie_word_embeddings", False)))


def _source_name(reader: ModelReader, name: str) -> str | None:
    if name in reader.tensors:
        return name
    if name in _TIED and _ties(reader):
        return next((alt for alt in _TIED[name] if alt in reader.tensors), None)
    return None


def _plan_one(name: str, readers: list[ModelReader], cfg: MergeConfig) -> PlannedTensor | None:
    if name in _TIED and _ties(readers[0]) and name not in readers[0].tensors:
        log.warning("dropping %s: the output config ties it to the merged input embedding", name)
        return None
    sources = [_source_name(reader, name) for reader in readers]
    missing = [reader.label for reader, source in zip(readers, sources) if source is None]
    if missing:
        have = [reader.label for reader, source in zip(readers, sources) if source is not None]
        raise ValueError(f"tensor {name!r} is missing in {', '.join(missing)} (present in {', '.join(have)})")
    infos = [reader.tensors[source] for reader, source in zip(readers, sources)]
    first = infos[0]
    for reader, info in zip(readers, infos):
        if info.shape != first.shape:
            raise ValueError(f"tensor {name!r}: shape {list(first.shape)} in {readers[0].label} but "
                             f"{list(info.shape)} in {reader.label}")
        if info.dtype != first.dtype and cfg.dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {first.dtype} in {readers[0].label} but {info.dtype} in "
                             f"{reader.label} (set `dtype:` in the config to cast all inputs to one dtype)")
    mergeable = first.dtype.is_floating_point
    dtype = (cfg.out_dtype or cfg.dtype or first.dtype) if mergeable else first.dtype
    return PlannedTensor(OutTensor(name, dtype, first.shape), tuple(sources), mergeable,
                         sum(info.nbytes for info in infos))


def plan_merge(readers: list[ModelReader], cfg: MergeConfig) -> list[PlannedTensor]:
    """Output tensors in the first reader's file order (sequential reads), then names only other models have."""
    order = sorted(readers[0].tensors.values(), key=lambda info: (str(info.file), info.offset))
    names = [info.name for info in order]
    known = set(names)
    for reader in readers[1:]:
        names += [name for name in reader.tensors if name not in known and not known.add(name)]
    plan = [planned for planned in (_plan_one(name, readers, cfg) for name in names) if planned is not None]
    if not plan:
        raise ValueError("the input models contain no tensors")
    return plan


def _block_cast(cfg: MergeConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype _merge_tensor casts inputs of `dtype` to, or None (no cast; widening to fp32 is skipped)."""
    widening = cfg.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)
    return cfg.dtype if cfg.dtype is not None and not widening and cfg.dtype != dtype else None


def plan_blocks(plan: list[PlannedTensor], readers: list, cfg: MergeConfig, block_mb: float | None, device: str,
                impl: str) -> list[PlannedTensor]:
    """The plan with row blocking set on each tensor that one input holds more than block_mb MiB of, where the
    method, device, inputs and extension allow it (blocked.py); block_mb None or 0: every tensor whole."""
    if not block_mb or cfg.method.name not in BLOCKED_KINDS or torch.device(device).type != "cpu":
        return plan
    if not all(type(reader) is ModelReader for reader in readers):
        return plan  # LoRA adapters materialise whole tensors
    budget = int(block_mb * 2**20)
    out = []
    for planned in plan:
        infos = [reader.tensors[source] for reader, source in zip(readers, planned.sources)]
        dtypes = {_block_cast(cfg, info.dtype) or info.dtype for info in infos}
        if (planned.mergeable and max(info.nbytes for info in infos) > budget and dtypes <= set(ops.FLOAT_DTYPES)
                and ops.extension_usable(impl)):  # the torch reference has no blocked path
            numel = planned.out.nbytes // planned.out.dtype.itemsize
            step = block_elements(budget, max(info.dtype.itemsize for info in infos))
            per_element = sum(info.dtype.itemsize for info in infos) + planned.out.dtype.itemsize
            planned = dataclasses.replace(planned, block=step, block_nbytes=min(step, numel) * per_element)
        out.append(planned)
    return out


def _merge_blocked(planned: PlannedTensor, readers: list[ModelReader], writer: ShardedWriter, cfg: MergeConfig,
                   opts: dict[str, Any], pool: ThreadPoolExecutor) -> None:
    glob, per_model = cfg.resolve(planned.out.name)
    merge = TensorMerge(name=planned.out.name, base=None, tensors=[], model_params=per_model, params=glob,
                        out_dtype=planned.out.dtype, impl="ext", seed=opts["seed"])
    skip_base = cfg.base is not None and BLOCKED_KINDS[cfg.method.name] == "linear"  # linear ignores the base
    inputs = list(zip(readers, planned.sources))[1 if skip_base else 0:]
    first = inputs[0][0].tensors[inputs[0][1]]
    source = BlockReader([reader for reader, _ in inputs], tuple(name for _, name in inputs),
                         planned.out.nbytes // planned.out.dtype.itemsize, planned.block,
                         _block_cast(cfg, first.dtype), pool)
    merge_blocked(cfg.method.name, merge, source, writer)


def _merge_tensor(planned: PlannedTensor, inputs: list[torch.Tensor], cfg: MergeConfig, opts: dict[str, Any],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The merged tensor: written into `out` (its slot in the output file) when given and the math runs on CPU."""
    if not planned.mergeable:
        return inputs[0]
    device = opts["device"]
    device_inputs = [tensor.to(device, non_blocking=True) for tensor in inputs]
    # mergekit casts inputs to `dtype` before merging. Widening bf16/fp16 to fp32 is exact and every op already
    # computes in fp32, so that cast is skipped (it would only double the memory of each tensor).
    widening = cfg.dtype == torch.float32 and device_inputs[0].dtype in (torch.bfloat16, torch.float16)
    if cfg.dtype is not None and not widening:
        device_inputs = [tensor.to(cfg.dtype) for tensor in device_inputs]
    glob, per_model = cfg.resolve(planned.out.name)
    base, others = (device_inputs[0], device_inputs[1:]) if cfg.base is not None else (None, device_inputs)
    merge = TensorMerge(name=planned.out.name, base=base, tensors=others, model_params=per_model, params=glob,
                        out_dtype=planned.out.dtype, impl=opts["impl"], seed=opts["seed"],
                        out=out if device.type == "cpu" else None)
    return cfg.method(merge)


def _stream(plan: list[PlannedTensor], readers: list[ModelReader], writer: ShardedWriter, cfg: MergeConfig,
            opts: dict[str, Any]) -> None:
    """Merge tensor by tensor. Faulting in tensor k+1's inputs overlaps the merge of tensor k only while the bytes
    in flight stay under 1.5 x the largest (inputs + output) of one tensor, so the peak stays near
    (models + 1) x the largest tensor: big tensors (embeddings) run alone, the many small ones overlap."""
    budget = 1.5 * max(planned.live_nbytes for planned in plan)
    bar = tqdm(total=sum(planned.out.nbytes for planned in plan), unit="B", unit_scale=True,
               desc=f"merge ({cfg.method.name})", disable=not opts["progress"])

    def prefetch(planned: PlannedTensor) -> None:
        for reader, source in zip(readers, planned.sources):
            reader.prefetch(source)

    with ThreadPoolExecutor(1, thread_name_prefix="merge-prefetch") as pool:
        pending: Future | None = None
        for index, planned in enumerate(plan):
            if pending is not None:
                pending.result()
                pending = None
            if planned.block:  # prefetches its own blocks (the next tensor waits: blocked tensors are few)
                _merge_blocked(planned, readers, writer, cfg, opts, pool)
                _TRIM()
                bar.update(planned.out.nbytes)
                continue
            live = planned.in_nbytes + planned.out.nbytes
            nxt = plan[index + 1] if index + 1 < len(plan) else None
            if nxt is not None and not nxt.block and live + nxt.in_nbytes <= budget:
                pending = pool.submit(prefetch, nxt)
            inputs = [reader.view(source) for reader, source in zip(readers, planned.sources)]
            out = _merge_tensor(planned, inputs, cfg, opts, writer.slot(planned.out.name))
            writer.write(planned.out.name, out)
            del inputs, out  # views of the input maps and of the output arena (unmapped at the end)
            for reader, source in zip(readers, planned.sources):
                reader.release(source)
            if planned.in_nbytes >= _TRIM_MIN_BYTES:  # casts, the torch reference and CUDA copies allocate per tensor
                _TRIM()
            bar.update(planned.out.nbytes)
        if pending is not None:
            pending.result()
    bar.close()


def _copy_side_files(cfg: MergeConfig, ref: ModelReader, tmp: Path) -> None:
    import json

    conf = dict(ref.config)
    if conf:
        dtype = cfg.out_dtype or cfg.dtype
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            conf["torch_dtype" if "torch_dtype" in conf and "dtype" not in conf else "dtype"] = name
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    for fname in _COPY_FILES[1:]:
        if (ref.path / fname).is_file():
            shutil.copy2(ref.path / fname, tmp / fname)
    tok_dir = cfg.tokenizer_source or ref.path
    for pattern in _TOKENIZER_GLOBS:
        for path in tok_dir.glob(pattern):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
    if cfg.source_text:
        (tmp / "nova_rt_merge.yaml").write_text(cfg.source_text)


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished temporary directory to out_dir (replacing an existing one only with force)."""
    if out_dir.exists():
        if not force:
            raise FileExistsError(f"output directory {out_dir} exists; pass --force (force=True) to replace it")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def merge_inputs(cfg: MergeConfig, config: str | Path | dict | MergeConfig) -> dict[str, Path]:
    """What a merge reads, by the config field that names it: every model, the tokenizer source, the YAML file."""
    inputs = {"base_model": cfg.base.path} if cfg.base is not None else {}
    inputs.update({f"models[{i}]": entry.path for i, entry in enumerate(cfg.models)})
    named = ([("base_model", cfg.base)] if cfg.base is not None else []) + [
        (f"models[{i}]", entry) for i, entry in enumerate(cfg.models)]
    inputs.update({f"{key} (the adapter's base)": entry.adapter_base for key, entry in named
                   if entry.adapter_base is not None})  # PEFT LoRA adapters (nova_rt.merge.adapter)
    if cfg.tokenizer_source is not None:
        inputs["tokenizer_source"] = cfg.tokenizer_source
    if isinstance(config, (str, Path)):
        inputs["merge config"] = Path(config)
    return inputs


def run_merge(config: str | Path | dict | MergeConfig, out_dir: str | Path, *, device: str = "cpu",
              force: bool = False, max_shard_size: str | int = "5GB", progress: bool = True, seed: int = 0,
              impl: str = "auto", block_mb: float | None = DEFAULT_BLOCK_MB, threads: int | None = None) -> Path:
    """Merge the models of a mergekit-style config into out_dir (an HF directory); returns out_dir.

    device: "cpu" or "cuda[:i]" (where the merge math runs; I/O is always via host memory). seed: DARE's mask seed.
    impl: "auto" (extension when available), "ext" or "torch" (pure-PyTorch reference).
    block_mb: a tensor of which one input holds more than this many MiB is merged in row blocks of about this size
    (blocked.py: same output, bounded memory); None or 0 merges every tensor whole.
    threads: CPU threads of the merge ops (torch.set_num_threads for the call; None: as set, OMP_NUM_THREADS).
    """
    if block_mb is not None and not block_mb >= 0:
        raise ValueError(f"block_mb must be a number of MiB >= 0 (0: no row blocks), got {block_mb!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    entries = ([cfg.base] if cfg.base is not None else []) + cfg.models
    check_output_disjoint(out_dir, merge_inputs(cfg, config), "output directory")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not force:
        raise FileExistsError(f"output directory {out_dir} exists; pass --force (force=True) to replace it")
    readers = [open_reader(entry) for entry in entries]  # a PEFT LoRA adapter reads as its base + B A
    plan = plan_blocks(plan_merge(readers, cfg), readers, cfg, block_mb, device, impl)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    largest = max(planned.block * planned.out.dtype.itemsize if planned.block else planned.out.nbytes
                  for planned in plan)
    writer = ShardedWriter(tmp, [planned.out for planned in plan], parse_size(max_shard_size), largest=largest)
    opts = {"device": torch.device(device), "impl": impl, "seed": seed, "progress": progress}
    threads_before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        _stream(plan, readers, writer, cfg, opts)
        writer.finish()
        _copy_side_files(cfg, readers[0], tmp)
        _publish(tmp, out_dir, force)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if threads is not None:
            torch.set_num_threads(threads_before)
        for reader in readers:
            reader.close()
    return out_dir
