"""LoRA adapters on megatron-core's tensor-parallel linears (lora.rank > 0 on parallel.backend=megatron).

Each HF linear a run adapts maps to a megatron linear: q/k/v_proj to parts of the fused linear_qkv, o_proj to
linear_proj, gate/up_proj to parts of the fused linear_fc1, down_proj to linear_fc2. An adapter is a submodule `lora`
of that linear plus a forward hook adding scale * B A x (scale = alpha / r) to its output. Column-parallel (qkv, fc1):
A replicated, B split on the output rows like the weight, and the part outputs interleaved in the weight's layout
(qkv per query group). Row-parallel (proj, fc2): A split on the input columns, B replicated, A x all-reduced over TP
(reduce-scattered under sequence parallelism) so the output equals the unsharded adapter's. The base is frozen, so
megatron's DDP and optimizer see the adapters only. A is drawn as peft draws it for the same run.seed (an HF LoRA
run and a megatron one start identical), B is zero. adapters_disabled switches them off (`enabled = False`): the
base model, DPO's reference on the policy's own shards (peft's disable_adapter on the HF backend).
final/ is the PEFT adapter directory of the HF backend (save_adapter_directory: shards gathered, peft names); a
reward model's score head (megatron_model.ScoreHead, replicated) trains in full next to them (peft's modules_to_save).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The HF linears of a Llama / Qwen2 decoder layer, in the order HF's named_modules (and peft's draws) visit them."""
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_MEGATRON = {"self_attention.linear_qkv": ("column", ("q_proj", "k_proj", "v_proj")),
             "self_attention.linear_proj": ("row", ("o_proj",)),
             "mlp.linear_fc1": ("column", ("gate_proj", "up_proj")),
             "mlp.linear_fc2": ("row", ("down_proj",))}
"""megatron linear (inside a TransformerLayer) -> (kind, the HF linears it fuses, in its output layout order)."""
SCORE_KEY = "base_model.model.score.weight"
"""peft's saved name of a reward model's score head (modules_to_save)."""


def hf_shape(arch, name: str) -> tuple[int, int]:
    """(out_features, in_features) of HF linear `name` in `arch` (megatron_model.HFArch)."""
    attn, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return {"q_proj": (attn, arch.hidden), "k_proj": (kv, arch.hidden), "v_proj": (kv, arch.hidden),
            "o_proj": (arch.hidden, attn), "gate_proj": (arch.ffn, arch.hidden), "up_proj": (arch.ffn, arch.hidden),
            "down_proj": (arch.hidden, arch.ffn)}[name]


def peft_key(layer: int, name: str, matrix: str) -> str:
    """peft's saved name of A or B (`matrix` "A" / "B") of HF linear `name` in decoder layer `layer`."""
    return f"base_model.model.model.layers.{layer}.{_PARENT[name]}.{name}.lora_{matrix}.weight"


def targets_of(lora, source: str) -> tuple[str, ...]:
    """The HF linears `lora` adapts (all of LINEAR_NAMES when target_modules is empty); a ConfigError names one this
    model's decoder layers lack."""
    from nova_rt.errors import ConfigError

    for name in lora.target_modules:
        if name not in LINEAR_NAMES:
            raise ConfigError(f"{source}: lora.target_modules: {name!r} is no linear layer of this model's decoder "
                              f"layers; they have: {', '.join(sorted(LINEAR_NAMES))}")
    return tuple(name for name in LINEAR_NAMES if not lora.target_modules or name in lora.target_modules)


def initial_a(arch, rank: int, targets: tuple[str, ...], seed: int) -> dict[tuple[int, str], torch.Tensor]:
    """Every adapter's initial A (rank, in) in fp32, by (layer, HF name): the draws peft's get_peft_model makes under
    torch.manual_seed(seed) (nova_rt.models.lora.add_adapters): per adapted linear in module order, nn.Linear's
    default init of A then of B, then A again (peft's reset_lora_parameters), each kaiming-uniform with a = sqrt(5)."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in range(arch.layers):
            for name in targets:
                out_features, in_features = hf_shape(arch, name)
                a_matrix, b_matrix = torch.empty(rank, in_features), torch.empty(out_features, rank)
                for tensor in (a_matrix, b_matrix, a_matrix):
                    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
                out[(layer, name)] = a_matrix
    return out


class ParallelLoraAdapter(nn.Module):
    """The adapters of one megatron linear: parameters `<hf name>_A` / `<hf name>_B` (this TP rank's shards) per
    adapted part; parts not adapted add zeros. `groups`: the output's interleave (qkv: local query groups)."""

    def __init__(self, kind: str, parts: list[tuple[str, int]], groups: int, scale: float, sequence_parallel: bool):
        super().__init__()
        self.kind, self.parts, self.groups, self.scale = kind, parts, groups, scale
        self.sequence_parallel = sequence_parallel
        self.enabled = True
        """False: the layer computes as its base (the reference model of DPO / GRPO)."""

    def add(self, name: str, a_matrix: torch.Tensor, out_local: int, tp_rank: int, tp: int) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        if self.kind == "row":
            columns = a_matrix.shape[1] // tp
            a_matrix = a_matrix[:, tp_rank * columns:(tp_rank + 1) * columns]
        a_param = nn.Parameter(a_matrix.clone().contiguous())
        b_param = nn.Parameter(torch.zeros(out_local, a_matrix.shape[0]))
        split, replicated = (a_param, b_param) if self.kind == "row" else (b_param, a_param)
        set_tensor_model_parallel_attributes(split, True, 1 if self.kind == "row" else 0, 1)
        # under SP the replicated matrix gets this rank's share of its gradient only: megatron sums it over TP
        replicated.sequence_parallel = self.sequence_parallel
        self.register_parameter(f"{name}_A", a_param)
        self.register_parameter(f"{name}_B", b_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tpar

        x = x.to(torch.float32)
        if self.kind == "row":
            name = self.parts[0][0]
            hidden = F.linear(x, getattr(self, f"{name}_A"))
            hidden = (tpar.reduce_scatter_to_sequence_parallel_region(hidden) if self.sequence_parallel
                      else tpar.reduce_from_tensor_model_parallel_region(hidden))
            return F.linear(hidden, getattr(self, f"{name}_B")) * self.scale
        if self.sequence_parallel:  # the layer's input is this rank's tokens; the base gathers them the same way
            x = tpar.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
        outs = []
        for name, size in self.parts:
            if not hasattr(self, f"{name}_A"):
                outs.append(x.new_zeros(*x.shape[:-1], size))
                continue
            hidden = F.linear(x, getattr(self, f"{name}_A"))
            if not self.sequence_parallel:  # B is split: A's input gradient sums over TP ranks
                hidden = tpar.copy_to_tensor_model_parallel_region(hidden)
            outs.append(F.linear(hidden, getattr(self, f"{name}_B")) * self.scale)
        lead = outs[0].shape[:-1]
        return torch.cat([o.reshape(*lead, self.groups, -1) for o in outs], dim=-1).reshape(*lead, -1)


def _add_output(module, inputs, output):
    adapter = module.lora
    if not adapter.enabled:
        return output
    out, bias = output
    return out + adapter(inputs[0]).to(out.dtype), bias


def add_adapters(chunks: list, arch, lora, *, seed: int, source: str, sequence_parallel: bool) -> int:
    """Freeze `chunks` (this rank's GPTModels) and give the targeted linears of their decoder layers adapters;
    returns the number of trainable parameters on this rank."""
    from megatron.core import parallel_state as ps

    targets = targets_of(lora, source)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    a_init = initial_a(arch, lora.rank, targets, seed)
    count = 0
    for chunk in chunks:
        chunk.requires_grad_(False)
        head = _score_head(chunk)
        if head is not None:  # a reward model: the head trains in full, as peft's modules_to_save
            head.requires_grad_(True)
            count += head.weight.numel()
        for layer in chunk.decoder.layers:
            index = layer.layer_number - 1
            for path, (kind, names) in _MEGATRON.items():
                if not any(name in targets for name in names):
                    continue
                sizes = [hf_shape(arch, name)[0] // (tp if kind == "column" else 1) for name in names]
                groups = arch.kv_heads // tp if names[0] == "q_proj" else 1
                adapter = ParallelLoraAdapter(kind, list(zip(names, sizes)), groups, lora.alpha / lora.rank,
                                              sequence_parallel)
                for name, size in zip(names, sizes):
                    if name in targets:
                        adapter.add(name, a_init[(index, name)], size, tp_rank, tp)
                linear = layer.get_submodule(path)
                linear.lora = adapter.to(linear.weight.device)
                linear.register_forward_hook(_add_output)
                count += sum(p.numel() for p in adapter.parameters())
    return count


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _score_head(chunk):
    """The chunk's score head (megatron_model.ScoreHead) when it holds one, else None."""
    from nova_rt.parallel.megatron_model import ScoreHead

    head = getattr(_unwrap(chunk), "output_layer", None)
    return head if isinstance(head, ScoreHead) else None


@contextlib.contextmanager
def adapters_disabled(chunks: list):
    """Context in which `chunks` (this rank's GPTModels, DDP-wrapped or not) compute as their frozen base."""
    adapters = [module for chunk in chunks for module in _unwrap(chunk).modules()
                if isinstance(module, ParallelLoraAdapter)]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def local_pieces(chunks: list) -> list[tuple[str, str, int, torch.Tensor]]:
    """(peft key, how TP shards it: "rows" / "cols" / "full", TP rank, CPU tensor) for every adapter matrix here."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    out = []
    for chunk in chunks:
        head = _score_head(chunk)
        if head is not None:
            out.append((SCORE_KEY, "full", tp_rank, head.weight.detach().to("cpu", copy=True)))
        for layer in _unwrap(chunk).decoder.layers:
            for path, (kind, names) in _MEGATRON.items():
                adapter = getattr(layer.get_submodule(path), "lora", None)
                for name in names if adapter is not None else ():
                    if not hasattr(adapter, f"{name}_A"):
                        continue
                    for matrix, split in (("A", "cols" if kind == "row" else "full"),
                                          ("B", "full" if kind == "row" else "rows")):
                        tensor = getattr(adapter, f"{name}_{matrix}").detach().to("cpu", copy=True)
                        out.append((peft_key(layer.layer_number - 1, name, matrix), split, tp_rank, tensor))
    return out


def gather_adapter(chunks: list) -> dict[str, torch.Tensor] | None:
    """Collective: the full adapter tensors under peft's names on global rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    mine = local_pieces(chunks) if ps.get_data_parallel_rank(with_context_parallel=True) == 0 else []
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    shards: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for key, split, tp_rank, tensor in (piece for pieces in gathered for piece in pieces):
        shards.setdefault(key, {})[tp_rank] = (split, tensor)
    out = {}
    for key, by_rank in shards.items():
        split = by_rank[0][0]
        ordered = [by_rank[rank][1] for rank in sorted(by_rank)]
        out[key] = ordered[0] if split == "full" else torch.cat(ordered, dim=0 if split == "rows" else 1)
    return out


def save_adapter_directory(chunks: list, lora, targets: tuple[str, ...], base_model: str, out_dir) -> None:
    """Collective: write `out_dir` as the HF backend's PEFT adapter directory (adapter_config.json as peft writes it,
    adapter_model.safetensors with fp32 adapters), global rank 0 writing."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = gather_adapter(chunks)
    if tensors is None:
        return
    out_dir = Path(out_dir)
    score = SCORE_KEY in tensors
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=list(targets), task_type="SEQ_CLS" if score else "CAUSAL_LM",
                        modules_to_save=["score"] if score else None, base_model_name_or_path=base_model)
    config.save_pretrained(out_dir)
    save_file({key: tensors[key].contiguous() for key in sorted(tensors)}, out_dir / "adapter_model.safetensors",
              metadata={"format": "pt"})


def trainable_state(chunk) -> dict[str, torch.Tensor]:
    """A chunk's state dict restricted to its trained tensors (a LoRA checkpoint: the adapters alone)."""
    module = _unwrap(chunk)
    names = {name for name, param in module.named_parameters() if param.requires_grad}
    return {key: value for key, value in module.state_dict().items() if key in names}


def load_trainable_state(chunk, state: dict) -> None:
    """Inverse of trainable_state: the adapters from `state`, the frozen base as loaded."""
    module = _unwrap(chunk)
    missing, unexpected = module.load_state_dict(state, strict=False)
    trained = {name for name, param in module.named_parameters() if param.requires_grad}
    if unexpected or trained & set(missing):
        raise RuntimeError(f"Error(s) in loading state_dict of the LoRA adapters:\n  missing "
                           f"{sorted(trained & set(missing))[:3]}, unexpected {sorted(unexpected)[:3]}")
