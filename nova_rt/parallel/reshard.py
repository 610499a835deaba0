"""Resume a megatron checkpoint in another parallel layout: TP, PP, VPP, DP, distributed optimizer on or off.

Each rank's checkpoint file (nova_rt.parallel.checkpoint) carries `describe(backend)`: the HF name and TP layout kind
(hf_convert) of every parameter and where its Adam state sits. `load_resharded` then, on every rank of the new
layout, reads the old DP rank 0 files of every TP/PP position (memory-mapped), assembles weights and both Adam
moments into full HF-named tensors (`hf_convert.assemble`), cuts its own shards out of them (`hf_convert.load_shard`)
and writes them in its own optimizer's format for `MegatronTrainer.load_state_dict`.

The conversion is bit-exact; a continued run matches an uninterrupted one bit for bit only when both layouts sum in
the same order (PP, or DP, with clipping off), to rounding otherwise (TP). Not carried: RNG states and per-rank stage
state (`extra`, e.g. GRPO's sampler: refused). fp32 parameters only (bf16/fp16 refused). Each rank holds the full
weights and both moments in fp32 while converting. Step by step: docs/parallelism.md#resharding-a-checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nova_rt.errors import CheckpointError
from nova_rt.parallel import hf_convert

MOMENTS = ("exp_avg", "exp_avg_sq")
log = logging.getLogger(__name__)


class _DictReader:
    """hf_convert.load_shard's reader interface over full in-memory HF tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor = self.tensors[name]
        return tensor[start:stop] if tensor.dim() else tensor

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name][:, start:stop]


def _optimizers(backend) -> list:
    """The megatron optimizers inside get_megatron_optimizer's ChainedOptimizer; none for a frozen backend."""
    if backend.optimizer is None:
        return []
    return list(getattr(backend.optimizer, "chained_optimizers", [backend.optimizer]))


def _chunks(backend) -> list:
    return [getattr(chunk, "module", chunk) for chunk in backend.model]


def _param_ids(backend) -> dict[int, tuple[int, str]]:
    return {id(param): (i, name) for i, chunk in enumerate(_chunks(backend))
            for name, param in chunk.named_parameters()}


def _dp_zero_offsets(opt, ids: dict) -> list[tuple[int, int, str, int, int]]:
    """(buffer index, chunk, name, start, numel) of each parameter in the world tensors of
    DistributedOptimizer.get_parameter_state_dp_zero: per buffer, its buckets back to back, each cut to its
    unpadded length, so a parameter at buffer index `start` of bucket b sits at
    start - b.offset + (unpadded lengths of the buckets before b)."""
    out = []
    for gbuf, buf in enumerate(opt.buffers):
        before = [0]
        for bucket in buf.buckets:
            before.append(before[-1] + bucket.numel_unpadded)
        for param, (start, end, bucket_index) in buf.param_index_map.items():
            offset = before[bucket_index] + start - buf.buckets[bucket_index].offset
            out.append((gbuf, *ids[id(param)], offset, end - start))
    return out


def _is_dp_zero(opt) -> bool:
    return hasattr(opt, "get_parameter_state_dp_zero")


def describe(backend) -> dict:
    """What `load_resharded` needs to read this rank's file under another layout (stored in the file)."""
    from megatron.core import parallel_state as ps

    ids = _param_ids(backend)
    optimizers = []
    for opt in _optimizers(backend):
        if _is_dp_zero(opt):
            optimizers.append({"dp_zero": _dp_zero_offsets(opt, ids)})
        else:  # torch's state_dict numbers parameters in param-group order
            optimizers.append({"torch": [ids[id(param)] for group in opt.optimizer.param_groups
                                         for param in group["params"]]})
    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
            "params": [{name: hf_convert.hf_names(chunk, name, backend.arch.tied)
                        for name, _ in chunk.named_parameters()} for chunk in _chunks(backend)],
            "optimizers": optimizers}


def _optimizer_list(state):
    """A saved backend optimizer state as one entry per megatron optimizer (see MegatronTrainer.state_dict)."""
    if isinstance(state, dict) and "distributed" in state:
        return state["distributed"]
    return state if isinstance(state, list) else [state]


def _moments(desc: dict, saved, shapes: dict) -> tuple[dict, float | None]:
    """({(chunk, name): {moment: tensor}}, Adam step) of one saved megatron optimizer."""
    out = {}
    if "torch" in desc:
        step = None
        for index, key in enumerate(desc["torch"]):
            if index in saved["state"]:
                param_state = saved["state"][index]
                out[key] = {moment: param_state[moment] for moment in MOMENTS}
                step = float(param_state["step"])
        return out, step
    world = saved["param_state"]
    for gbuf, chunk, name, start, numel in desc["dp_zero"]:
        (tensors,) = world[gbuf].values()  # one (param dtype, grad dtype) per buffer
        out[(chunk, name)] = {moment: tensors[moment][start:start + numel].view(shapes[(chunk, name)])
                              for moment in MOMENTS}
    return out, float(saved["common"]["optimizer"]["param_groups"][0]["step"])


def _full_tensors(files: list[dict], arch, old_tp: int) -> tuple[dict, float]:
    """{"weight" | moment: {HF name: full tensor}} and the Adam step from the old DP-rank-0 files."""
    pieces = {k: [] for k in ("weight", *MOMENTS)}
    step = None
    for rank_file in files:
        rank_description = rank_file["reshard"]
        layout = {(chunk, name): kind_names for chunk, names in enumerate(rank_description["params"])
                  for name, kind_names in names.items()}
        shapes = {(chunk, name): rank_file["model"][chunk][name].shape for chunk, name in layout}
        moments = {}
        for desc, saved in zip(rank_description["optimizers"], _optimizer_list(rank_file["optimizer"]), strict=True):
            found, found_step = _moments(desc, saved, shapes)
            moments.update(found)
            step = found_step if found_step is not None else step
        for (chunk, name), (kind, names) in layout.items():
            if name == "output_layer.weight" and names == ("model.embed_tokens.weight",):
                continue  # the last stage's copy of a tied embedding
            if rank_file["model"][chunk][name].dtype != torch.float32:
                raise CheckpointError(f"{name} was saved in {rank_file['model'][chunk][name].dtype}: resharding "
                                      "needs fp32 parameters (the optimizer's fp32 master weights are not carried); "
                                      "resume with the layout it was written with")
            pieces["weight"].append((kind, names, rank_description["tp_rank"], rank_file["model"][chunk][name]))
            zeros = torch.zeros_like(rank_file["model"][chunk][name])  # a parameter Adam never stepped
            for moment in MOMENTS:
                saved_moment = moments.get((chunk, name), {}).get(moment, zeros)
                pieces[moment].append((kind, names, rank_description["tp_rank"], saved_moment))
    if step is None:
        raise RuntimeError("the checkpoint holds no Adam step (saved before the first optimizer step?)")
    return {k: hf_convert.assemble(v, arch, old_tp) for k, v in pieces.items()}, step


def _new_optimizer_state(backend, shard, step: float):
    """This rank's optimizer state in the format MegatronTrainer.state_dict would have written."""
    ids = _param_ids(backend)
    states = []
    for opt in _optimizers(backend):
        groups = opt.optimizer.param_groups
        if not _is_dp_zero(opt):
            params = [ids[id(param)] for group in groups for param in group["params"]]
            state = {i: {"step": torch.tensor(step), **{moment: shard(moment, key) for moment in MOMENTS}}
                     for i, key in enumerate(params)}
            states.append({"state": state, "param_groups": opt.optimizer.state_dict()["param_groups"]})
            continue
        common = {"optimizer": {"param_groups": [{**{k: v for k, v in group.items() if k != "params"}, "step": step}
                                                 for group in groups]}}
        world = None
        if opt.data_parallel_group.rank() == 0:  # dp-zero state lives on DP rank 0 and is scattered from there
            world = {gbuf: {dtype: {**{k: torch.zeros(buf.numel_unpadded) for k in ("param", *MOMENTS)},
                                    "numel_unpadded": buf.numel_unpadded}
                            for dtype in opt.gbuf_ranges[gbuf]}
                     for gbuf, buf in enumerate(opt.buffers)}
            for gbuf, chunk, name, start, numel in _dp_zero_offsets(opt, ids):
                (tensors,) = world[gbuf].values()
                for field in ("param", *MOMENTS):
                    source = "weight" if field == "param" else field
                    tensors[field][start:start + numel] = shard(source, (chunk, name)).view(-1)
        states.append({"common": common, "param_state": world})
    if backend.pcfg.distributed_optimizer:
        return {"distributed": states}
    return states[0] if len(states) == 1 else states


_LAYOUT_KEYS = ("world_size", "tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel",
                "distributed_optimizer")


@torch.no_grad()
def load_resharded(backend, path: Path, meta: dict) -> tuple[int, None]:
    """Load checkpoint `path`, written with layout `meta` (its meta.json), into `backend`'s different layout;
    returns (step, None). Collective with the distributed optimizer. See the module docstring."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from nova_rt.checkpoint import rng_state, safe_load

    if getattr(backend, "lora", None) is not None:

        layout = ", ".join(f"{key}={meta.get(key)}" for key in _LAYOUT_KEYS)
        raise CheckpointError(f"{path}: a LoRA checkpoint resumes only in the parallel layout that wrote it "
                              f"({layout}); resume with those settings")
    if backend.dtype != torch.float32:
        raise CheckpointError(f"{path}: resuming in another parallel layout needs fp32 parameters (with "
                              f"{backend.dtype} the fp32 master weights would have to be carried); resume with "
                              f"{meta}")
    files = [safe_load(file_path, mmap=True, numpy_arrays=True) for file_path in sorted(path.glob("rank_*.pt"))]
    if len(files) != meta["world_size"] or any("reshard" not in rank_file for rank_file in files):
        raise CheckpointError(f"{path} cannot be resumed in another layout (it lacks rank files or their layout "
                           f"description; written before resharding existed?); resume with {meta}")
    if any(rank_file["extra"] is not None for rank_file in files):
        raise CheckpointError(f"{path} holds per-rank stage state (e.g. GRPO's sampler), which cannot be moved "
                              "to another layout; resume with the layout it was written with")
    log.info("%s was written with %s: resharding it into this run's layout", path, meta)
    full, step = _full_tensors([rank_file for rank_file in files if rank_file["reshard"]["dp_rank"] == 0], backend.arch,
                               meta["tensor_parallel"])
    tp_size, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    chunks = _chunks(backend)
    params = {(i, name): param for i, chunk in enumerate(chunks) for name, param in chunk.named_parameters()}

    def shard(kind_of_tensor: str, key: tuple[int, str]) -> torch.Tensor:
        chunk, name = key
        kind, names = hf_convert.hf_names(chunks[chunk], name, backend.arch.tied)
        return hf_convert.load_shard(_DictReader(full[kind_of_tensor]), kind, names, backend.arch,
                                     tuple(params[key].shape), tp_size, tp_rank).to(torch.float32)

    model = []
    for i, chunk in enumerate(chunks):
        state_dict = chunk.state_dict()
        state_dict.update({name: shard("weight", (i, name)) for name, _ in chunk.named_parameters()})
        model.append(state_dict)
    state = {"model": model, "optimizer": _new_optimizer_state(backend, shard, step),
             "rng": {**rng_state(), "megatron": tensor_parallel.get_cuda_rng_tracker().get_states()}}
    backend.load_state_dict(state)
    return int(files[0]["step"]), None
