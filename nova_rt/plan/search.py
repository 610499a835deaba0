"""What a run needs (Workload, read from a nova_rt Config), the layouts that could run it, and the memory and time
of each (Plan). `search` enumerates megatron layouts (TP within a node dividing the head counts and the MLP, PP
dividing the layers, VPP, CP for SFT, the distributed optimizer) and HF ones (DDP, FSDP2), micro-batches, each
with and without recompute of every layer (train.activation_checkpointing 1), and returns every layout with its
prediction, the fitting ones fastest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nova_rt.plan import memory
from nova_rt.plan.hardware import ALLOCATOR_RESERVE_BYTES, Gpu
from nova_rt.plan.shapes import ModelShape
from nova_rt.plan.timing import Timing, step_time

BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass(frozen=True)
class Workload:
    stage: str  # sft | rm | dpo | grpo
    row_tokens: int  # tokens of one packed row (one sequence for GRPO)
    doc_length: int  # tokens of one document (attention FLOPs)
    global_rows: int  # rows per optimizer step, all DP ranks
    model_bytes: int  # model.dtype
    master_bytes: int  # trained parameters on the HF backend (fp32, or model dtype with master_weights=model_dtype)
    compute_bytes: int
    reference: bool  # a frozen reference model resident while training
    rollout_engine: str = ""  # grpo: hf | vllm
    rollout_sequences: int = 0  # grpo: sequences generated per step, all ranks
    rollout_tp: int = 1
    rollout_budget: float = 0.0  # grpo vllm: gpu_memory_utilization
    rollout_sleep: bool = True

    @property
    def head(self) -> str:
        return "score" if self.stage == "rm" else "lm"


@dataclass(frozen=True)
class Layout:
    backend: str
    tp: int = 1
    pp: int = 1
    vpp: int = 0
    cp: int = 1
    dp: int = 1
    micro_batch: int = 1
    checkpoint: bool = False
    dist_opt: bool = False
    data_parallel: str = "ddp"

    def describe(self) -> str:
        if self.backend == "hf":
            parts = [f"hf {self.data_parallel} DP={self.dp}"]
        else:
            parts = [f"TP={self.tp}", f"PP={self.pp}"] + ([f"VPP={self.vpp}"] if self.vpp > 1 else [])
            parts += ([f"CP={self.cp}"] if self.cp > 1 else []) + [f"DP={self.dp}"]
            parts += ["SP"] if self.tp > 1 else []
            parts += ["distopt"] if self.dist_opt else []
        parts.append(f"mb={self.micro_batch}")
        parts += ["recompute"] if self.checkpoint else []
        return " ".join(parts)


@dataclass
class Plan:
    layout: Layout
    memory: dict[str, int]  # bytes per GPU by component, the busiest rank; "total" included
    timing: Timing
    fits: bool
    notes: list[str] = field(default_factory=list)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def megatron_layouts(shape: ModelShape, work: Workload, gpus: int, per_node: int, micro_batches: list[int]):
    for tp in divisors(per_node):
        if shape.heads % tp or shape.kv_heads % tp or shape.ffn % tp or gpus % tp:
            continue
        for pp in divisors(shape.layers):
            if gpus % (tp * pp):
                continue
            for cp in ([1, 2, 4, 8] if work.stage == "sft" else [1]):
                if gpus % (tp * pp * cp) or work.row_tokens % (2 * cp):
                    continue
                dp = gpus // (tp * pp * cp)
                if work.global_rows % dp:
                    continue
                vpps = [0] + [v for v in (2, 4) if pp > 2 and shape.layers % (pp * v) == 0]
                for vpp in vpps:
                    for mb in micro_batches:
                        if (work.global_rows // dp) % mb:
                            continue
                        for dist_opt in ((False, True) if dp > 1 else (False,)):
                            for checkpoint in (False, True):  # train.activation_checkpointing 0 or 1
                                yield Layout("megatron", tp, pp, vpp, cp, dp, mb, checkpoint, dist_opt)


def hf_layouts(work: Workload, gpus: int, micro_batches: list[int]):
    if work.global_rows % gpus:
        return
    for kind in (("ddp", "fsdp2") if gpus > 1 else ("ddp",)):
        for mb in micro_batches:
            if (work.global_rows // gpus) % mb == 0:
                for checkpoint in (False, True):
                    yield Layout("hf", dp=gpus, micro_batch=mb, checkpoint=checkpoint, data_parallel=kind)


def evaluate(shape: ModelShape, work: Workload, gpu: Gpu, gpus: int, per_node: int, layout: Layout,
             overlap_dp: bool = False, overlap_tp: bool = False) -> Plan:
    lay = layout
    micro_tokens = lay.micro_batch * work.row_tokens
    micro_batches = work.global_rows // (lay.dp * lay.micro_batch)
    mem: dict[str, int] = {}
    compute_bytes = work.model_bytes if lay.backend == "megatron" else work.compute_bytes  # megatron: no autocast
    if lay.backend == "megatron":
        stages = sorted({0, lay.pp - 1})
        best: dict[str, int] | None = None
        for stage in stages:
            # megatron DDP reduces, and its distributed optimizer shards, over DP x CP
            static = memory.megatron_static(shape, lay.tp, lay.pp, lay.vpp, lay.dp * lay.cp, lay.dist_opt,
                                            work.model_bytes, stage, head=work.head)
            layers = shape.layers // lay.pp
            in_flight = min(lay.pp - stage, micro_batches)
            if lay.vpp > 1 and stage == 0:
                in_flight = in_flight * (1 + (lay.pp - 1) / (lay.pp * lay.vpp))
            saved = memory.megatron_stage_bytes(shape, micro_tokens // lay.cp, layers, lay.tp, lay.tp > 1,
                                                in_flight=in_flight, checkpoint_every=1 if lay.checkpoint else 0,
                                                chunks=max(lay.vpp, 1), first=stage == 0, last=stage == lay.pp - 1,
                                                head=work.head, compute_bytes=compute_bytes)
            parts = {"params": static.params, "grads": static.grads, "optimizer": static.optimizer,
                     "activations": saved["activations"], "logits": saved["logits"], "comm": 0}
            if work.reference:
                ref = memory.megatron_static(shape, lay.tp, lay.pp, lay.vpp, 1, False, work.model_bytes, stage)
                parts["reference"] = ref.params
            if best is None or sum(parts.values()) > sum(best.values()):
                best = parts
        mem = best or {}
        dp_bytes = mem["grads"] + (mem["params"] if lay.dist_opt else mem["grads"])
        local_tokens = max(micro_tokens // lay.cp, 1)
        saved_per_token = memory.megatron_layer_bytes(shape, local_tokens, lay.tp, lay.tp > 1,
                                                      compute_bytes) / local_tokens
    else:
        static = memory.hf_static(shape, lay.dp, lay.data_parallel, work.master_bytes, head=work.head)
        docs = [work.doc_length] * max(1, micro_tokens // work.doc_length)
        full, kept = (memory.hf_activation_bytes(shape, docs, micro_tokens, param_bytes=work.master_bytes,
                                                 compute_bytes=work.compute_bytes, checkpoint_every=every)
                      for every in (0, 1))
        layer_saved = (full - kept) // shape.layers
        saved = kept + layer_saved if lay.checkpoint else full  # recompute: one layer's worth rebuilt at a time
        logits = int(0.02 * 2 * micro_tokens * shape.vocab) if work.head == "lm" else 0  # fused op's chunk
        mem = {"params": static.params, "grads": static.grads, "optimizer": static.optimizer,
               "activations": saved, "logits": logits, "comm": static.comm}
        if work.reference:
            mem["reference"] = work.model_bytes * shape.total_params(work.head)
        full_bytes = work.master_bytes * shape.total_params(work.head)
        dp_bytes = 3 * full_bytes if lay.data_parallel == "fsdp2" else 2 * full_bytes
        saved_per_token = layer_saved / max(micro_tokens, 1)
    if work.stage == "grpo":
        mem["rollout"] = rollout_bytes(shape, work, gpu, gpus, lay)
    timing = step_time(shape=shape, gpu=gpu, gpus=gpus, gpus_per_node=per_node, tp=lay.tp, pp=lay.pp, vpp=lay.vpp,
                       cp=lay.cp, dp=lay.dp, micro_batches=micro_batches, micro_batch_tokens=micro_tokens,
                       doc_length=work.doc_length, checkpoint=lay.checkpoint,
                       saved_bytes_per_layer_token=saved_per_token, dp_bytes=dp_bytes, backend=lay.backend,
                       overlap_dp=overlap_dp, overlap_tp=overlap_tp, head=work.head, compute_bytes=compute_bytes)
    train_phase = sum(v for k, v in mem.items() if k != "rollout")
    if work.stage == "grpo" and work.rollout_sleep:  # the engine sleeps while training, training state stays put
        static_part = mem["params"] + mem["optimizer"] + mem.get("reference", 0)
        static_part += mem["grads"] if lay.backend == "megatron" else 0
        peak = max(train_phase, static_part + mem["rollout"])
    else:
        peak = train_phase + mem.get("rollout", 0)
    mem["reserve"] = ALLOCATOR_RESERVE_BYTES
    mem["total"] = peak + ALLOCATOR_RESERVE_BYTES
    return Plan(layout, mem, timing, mem["total"] <= gpu.memory_bytes)


def rollout_bytes(shape: ModelShape, work: Workload, gpu: Gpu, gpus: int, lay: Layout) -> int:
    """GRPO generation per GPU: the KV cache of this rank's share of the step's sequences (prompt + response), plus
    for vLLM its own bf16 weights (split over grpo.rollout.tensor_parallel), at least its reserved budget."""
    engines = gpus // work.rollout_tp if work.rollout_engine == "vllm" else lay.dp
    per_engine = math.ceil(work.rollout_sequences / max(engines, 1))
    kv = per_engine * work.row_tokens * 2 * shape.layers * shape.kv_width * work.model_bytes
    if work.rollout_engine != "vllm":  # nova_rt's decode loop: on the policy itself (hf), on a gathered copy (megatron)
        return kv if lay.backend == "hf" else kv + work.model_bytes * shape.total_params()
    need = (work.model_bytes * shape.total_params() + kv) // work.rollout_tp
    return max(need, int(work.rollout_budget * gpu.memory_bytes))


def search(shape: ModelShape, work: Workload, gpu: Gpu, gpus: int, per_node: int, backends: tuple[str, ...],
           forced: dict | None = None, overlap_dp: bool = False) -> list[Plan]:
    """Every candidate layout evaluated; fitting ones first, fastest first, then the rest by memory."""
    micro_batches = [1, 2, 4]
    layouts = []
    if "megatron" in backends:
        layouts += list(megatron_layouts(shape, work, gpus, per_node, micro_batches))
    if "hf" in backends:
        layouts += list(hf_layouts(work, gpus, micro_batches))
    for key, value in (forced or {}).items():
        layouts = [lay for lay in layouts if getattr(lay, key) == value]
    plans = [evaluate(shape, work, gpu, gpus, per_node, lay, overlap_dp) for lay in layouts]
    return sorted(plans, key=lambda p: (not p.fits, -p.timing.tokens_per_s_per_gpu if p.fits else p.memory["total"]))
