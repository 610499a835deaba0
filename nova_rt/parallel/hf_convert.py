"""HF safetensors straight into megatron TP/PP shards, and the shards back into an HF directory (bit-exact).

Loading: each rank reads only the rows/columns its parameters own (`safe_open` + `get_slice`), so no rank ever holds
the whole model and no offline conversion step exists. Saving: every rank of data-parallel rank 0 sends its CPU
shards to global rank 0 (`gather_object`), which reassembles full HF tensors and writes config + safetensors;
non-weight files (config.json, tokenizer files, generation_config.json, chat template) are copied verbatim.

Layout kinds (TP size t, rank r): replicated (norms, score), vocab (embed_tokens, lm_head: rows of the table
zero-padded to Vp), column, row (o_proj, down_proj: columns split), fc1 (gate/up: rank r holds [gate rows of r; up
rows of r]) and qkv (megatron's interleaved per-group layout [Q query heads; 1 key head; 1 value head] x H rows).
The table with shapes: docs/parallelism.md#tp-layout-kinds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_LAYER_MAP = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": ("qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                "self_attn.v_proj.bias")),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
SCORE_HEAD = "score.weight"  # transformers' *ForSequenceClassification head


def _is_score_head(chunk) -> bool:
    from nova_rt.parallel.megatron_model import ScoreHead

    return isinstance(getattr(chunk, "output_layer", None), ScoreHead)


def hf_names(chunk, name: str, tied: bool) -> tuple[str, tuple[str, ...]]:
    """(layout kind, HF tensor names) of megatron parameter `name` in model chunk `chunk`."""
    if name == "embedding.word_embeddings.weight":
        return "vocab", ("model.embed_tokens.weight",)
    if name == "output_layer.weight":
        if _is_score_head(chunk):
            return "replicated", (SCORE_HEAD,)
        return "vocab", ("model.embed_tokens.weight" if tied else "lm_head.weight",)
    if name == "decoder.final_layernorm.weight":
        return "replicated", ("model.norm.weight",)
    if ".lora." in name:  # a LoRA adapter (nova_rt.parallel.megatron_lora): no tensor of the HF model
        return "lora", (name,)
    layer_match = _LAYER_RE.match(name)
    if layer_match and layer_match.group(2) in _LAYER_MAP:
        layer = chunk.decoder.layers[int(layer_match.group(1))].layer_number - 1  # global 0-based layer index
        kind, suffixes = _LAYER_MAP[layer_match.group(2)]
        return kind, tuple(f"model.layers.{layer}.{suffix}" for suffix in suffixes)
    raise KeyError(f"megatron parameter {name!r} has no HF counterpart in nova_rt.parallel.hf_convert")


class SafetensorsReader:
    """Lazy, slice-wise access to the tensors of an HF safetensors checkpoint (single file or sharded)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(self.dir / "model.safetensors", "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                                    "(the megatron backend reads safetensors checkpoints only)")
        self._handles = {}

    def _slice(self, name: str):
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.dir / file, "pt")
        return self._handles[file].get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor_slice = self._slice(name)
        return tensor_slice[start:stop] if tensor_slice.get_shape() else tensor_slice[:]

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(name)[:, start:stop]


# ----------------------------------------------------------------------------------------------- load
def _load_qkv(reader, names, arch, tp, rank):
    groups = arch.kv_heads // tp
    q_per_group, head_dim = arch.heads // arch.kv_heads, arch.head_dim
    first_group = rank * groups
    query = reader.rows(names[0], first_group * q_per_group * head_dim,
                        (first_group + groups) * q_per_group * head_dim)
    key = reader.rows(names[1], first_group * head_dim, (first_group + groups) * head_dim)
    value = reader.rows(names[2], first_group * head_dim, (first_group + groups) * head_dim)
    tail = query.shape[1:]
    parts = [query.reshape(groups, q_per_group * head_dim, *tail), key.reshape(groups, head_dim, *tail),
             value.reshape(groups, head_dim, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _load_vocab(reader, name, arch, local_rows, rank):
    start = rank * local_rows
    out = None
    if start < arch.vocab:
        part = reader.rows(name, start, min(start + local_rows, arch.vocab))
        out = torch.zeros(local_rows, *part.shape[1:], dtype=part.dtype)
        out[: part.shape[0]] = part
    return out


def load_shard(reader, kind, names, arch, param_shape, tp, rank) -> torch.Tensor:
    """The slice of HF tensors `names` that TP rank `rank` holds for a parameter of local shape `param_shape`."""
    if kind == "replicated":
        return reader.rows(names[0])
    if kind == "vocab":
        out = _load_vocab(reader, names[0], arch, param_shape[0], rank)
        return out if out is not None else torch.zeros(param_shape)
    if kind == "row":
        per_rank = param_shape[1]
        return reader.cols(names[0], rank * per_rank, (rank + 1) * per_rank)
    if kind == "fc1":
        per_rank = param_shape[0] // 2
        return torch.cat([reader.rows(hf_name, rank * per_rank, (rank + 1) * per_rank) for hf_name in names], dim=0)
    if kind == "qkv":
        return _load_qkv(reader, names, arch, tp, rank)
    raise ValueError(f"unknown layout kind {kind!r}")


@torch.no_grad()
def load_hf_into_chunks(chunks: list, model_dir: str | os.PathLike, arch, missing_ok: tuple[str, ...] = ()) -> int:
    """Copy the HF checkpoint in `model_dir` into this rank's model chunks; returns the number of tensors set.
    Parameters whose HF tensor is in `missing_ok` and absent from the checkpoint are left as they are (a reward
    head on a causal-LM checkpoint)."""
    from megatron.core import parallel_state as ps

    reader = SafetensorsReader(model_dir)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    count = 0
    for chunk in chunks:
        for name, param in _unwrap(chunk).named_parameters():
            kind, names = hf_names(_unwrap(chunk), name, arch.tied)
            if names[0] in missing_ok and names[0] not in reader.weight_map:
                continue
            shard = load_shard(reader, kind, names, arch, tuple(param.shape), tp, rank)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{model_dir}: {', '.join(names)} give a shard of shape {tuple(shard.shape)} for "
                                 f"megatron parameter {name} of shape {tuple(param.shape)} (TP rank {rank}/{tp})")
            param.data.copy_(shard.to(param.dtype))
            count += 1
    return count


def _unwrap(module):
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


# ----------------------------------------------------------------------------------------------- save
def local_pieces(chunks: list, arch) -> list[tuple[str, tuple[str, ...], int, torch.Tensor]]:
    """(kind, HF names, TP rank, CPU tensor) for every parameter this rank holds (tied lm_head skipped)."""
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    out = []
    for chunk in chunks:
        for name, param in _unwrap(chunk).named_parameters():
            if arch.tied and name == "output_layer.weight" and not _is_score_head(_unwrap(chunk)):
                continue  # the copy of the embedding held by the last stage
            kind, names = hf_names(_unwrap(chunk), name, arch.tied)
            out.append((kind, names, rank, param.detach().to("cpu", copy=True)))
    return out


def _split_qkv(piece, arch, tp):
    groups, q_per_group, head_dim = arch.kv_heads // tp, arch.heads // arch.kv_heads, arch.head_dim
    tail = piece.shape[1:]
    grouped = piece.reshape(groups, (q_per_group + 2) * head_dim, *tail)
    query, key, value = grouped.split([q_per_group * head_dim, head_dim, head_dim], dim=1)
    return [part.reshape(-1, *tail) for part in (query, key, value)]


def assemble(pieces: list, arch, tp: int) -> dict[str, torch.Tensor]:
    """Full HF tensors from the pieces of all ranks (inverse of `load_shard`)."""
    by_key: dict[tuple, dict[int, torch.Tensor]] = {}
    for kind, names, rank, tensor in pieces:
        by_key.setdefault((kind, names), {})[rank] = tensor
    out = {}
    for (kind, names), ranks in by_key.items():
        if kind == "replicated":
            out[names[0]] = ranks[0]
            continue
        if sorted(ranks) != list(range(tp)):
            raise RuntimeError(f"pieces of {names} came from TP ranks {sorted(ranks)}, expected 0..{tp - 1}")
        ordered = [ranks[tp_rank] for tp_rank in range(tp)]
        if kind == "vocab":
            out[names[0]] = torch.cat(ordered, dim=0)[: arch.vocab]
        elif kind == "row":
            out[names[0]] = torch.cat(ordered, dim=1)
        elif kind == "fc1":
            halves = [piece.chunk(2, dim=0) for piece in ordered]
            for i, hf_name in enumerate(names):
                out[hf_name] = torch.cat([half[i] for half in halves], dim=0)
        elif kind == "qkv":
            split = [_split_qkv(piece, arch, tp) for piece in ordered]
            for i, hf_name in enumerate(names):
                out[hf_name] = torch.cat([parts[i] for parts in split], dim=0)
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_hf_dir(tensors: dict[str, torch.Tensor], src_dir, out_dir, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write tensors as (possibly sharded) safetensors plus every non-weight file of `src_dir`."""
    from safetensors.torch import save_file

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in INDEX_FILES:
            shutil.copy2(path, out / path.name)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensors[name], size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def save_chunks_as_hf(chunks: list, arch, src_dir, out_dir) -> Path | None:
    """Collective over all ranks: gather shards of data-parallel (x context-parallel) rank 0 on global rank 0, which
    writes `out_dir`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    first_copy = ps.get_data_parallel_rank(with_context_parallel=True) == 0  # CP ranks hold copies too
    mine = local_pieces(chunks, arch) if first_copy else []
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    pieces = [piece for rank_pieces in gathered for piece in rank_pieces]
    tensors = assemble(pieces, arch, ps.get_tensor_model_parallel_world_size())
    return write_hf_dir(tensors, src_dir, out_dir)
