"""`nova-rt plan`: the parallel layout for a config's model and stage on N GPUs, memory per GPU and step time.

    nova-rt plan --config X.yaml --gpus 16 [--gpus-per-node 8] [--gpu h100-80gb] [--json] [--write]
                 [--backend any|hf|megatron] [--tp N] [--pp N] [--cp N] [--top 5] [--set k=v ...]

Prints the best layouts that fit (memory broken down, predicted step time, MFU, tokens/s/GPU); --write puts the
best one into the config's `parallel` section (and train.micro_batch, train.activation_checkpointing), through a
temporary file and a rename. Nothing fits: exit 2 naming the smallest memory found and what would make it fit.
The model behind the numbers and its assumptions: docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from nova_rt.errors import ConfigError
from nova_rt.plan.hardware import ALLOCATOR_RESERVE_BYTES, GIB, GPUS, gpu_named
from nova_rt.plan.search import BYTES, Plan, Workload, search
from nova_rt.plan.shapes import ModelShape, check_layout, load_shape

STAGES = ("sft", "rm", "dpo", "grpo")
COLUMNS = ("params", "grads", "optimizer", "activations", "logits", "reference", "rollout", "comm", "reserve")


def workload(cfg) -> Workload:
    """What cfg's stage needs per step (rows, tokens, dtypes, reference, rollout) as the planner models it."""
    stage = cfg.run.stage
    if stage not in STAGES:
        raise ConfigError(f"{cfg.source}: run.stage={stage}: nova-rt plan plans {', '.join(STAGES)}")
    model_bytes = BYTES[cfg.model.dtype]
    master = model_bytes if cfg.model.master_weights == "model_dtype" else 4
    compute = 4 if cfg.train.precision == "fp32" else 2
    common = dict(model_bytes=model_bytes, master_bytes=master, compute_bytes=compute)
    if stage == "grpo":
        grpo = cfg.grpo
        sequence = grpo.rollout.max_model_len or cfg.data.max_seq_len
        sequences = grpo.sampling.prompts_per_step * grpo.sampling.group_size
        return Workload(stage, sequence, sequence, max(1, sequences // grpo.minibatches), reference=grpo.needs_ref,
                        rollout_engine=grpo.rollout.engine, rollout_sequences=sequences,
                        rollout_tp=grpo.rollout.tensor_parallel, rollout_budget=grpo.rollout.gpu_memory_utilization,
                        rollout_sleep=grpo.rollout.sleep, **common)
    row = cfg.packing.max_tokens if cfg.packing.enabled else cfg.data.max_seq_len
    reference = stage == "dpo" and cfg.dpo.reference_logprobs == "online" and cfg.dpo.loss_type in ("sigmoid", "ipo")
    return Workload(stage, row, min(cfg.data.max_seq_len, row), cfg.train.global_batch, reference=reference, **common)


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def render(plans: list[Plan], shape: ModelShape, work: Workload, gpu, gpus: int) -> str:
    lines = [f"{shape.name}: {shape.total_params(work.head) / 1e9:.2f}B parameters, stage {work.stage}, "
             f"{work.row_tokens} tokens a row, {work.global_rows} rows a step, on {gpus} x {gpu.name} "
             f"({gib(gpu.memory_bytes)} GiB each); memory in GiB per GPU (busiest rank)",
             f"{'layout':44s} {'total':>6s} " + " ".join(f"{c[:6]:>6s}" for c in COLUMNS)
             + f" {'step s':>7s} {'MFU':>5s} {'tok/s/GPU':>9s}"]
    for plan in plans:
        mem, t = plan.memory, plan.timing
        lines.append(f"{plan.layout.describe():44s} {gib(mem['total']):>6s} "
                     + " ".join(f"{gib(mem.get(c, 0)):>6s}" for c in COLUMNS)
                     + f" {t.step_s:7.3g} {100 * t.mfu:4.1f}% {t.tokens_per_s_per_gpu:9.0f}")
    lines.append(f"assumed: {gpu.achievable_bf16 / 1e12:.0f} TFLOP/s achievable bf16 ({gpu.peak_bf16 / 1e12:.0f} peak, "
                 f"MFU against peak), NVLink {gpu.nvlink / 1e9:.0f} GB/s, network {gpu.network / 1e9:.0f} GB/s per "
                 f"GPU, {gib(ALLOCATOR_RESERVE_BYTES)} GiB allocator reserve; docs/plan.md")
    return "\n".join(lines)


def no_fit_error(plans: list[Plan], shape: ModelShape, work: Workload, gpu, gpus: int, per_node: int,
                 backends: tuple[str, ...], forced: dict, source: str) -> ConfigError:
    smallest = min(plans, key=lambda p: p.memory["total"]) if plans else None
    if smallest is None:
        return ConfigError(f"{source}: no layout divides {gpus} GPUs for {shape.name} (global batch "
                           f"{work.global_rows} rows over DP, heads {shape.heads}/{shape.kv_heads}, layers "
                           f"{shape.layers}); try another --gpus or train.global_batch")
    hints = []
    for factor in (2, 4, 8, 16):
        more = gpus * factor
        if any(p.fits for p in search(shape, work, gpu, more, per_node, backends, forced)):
            hints.append(f"--gpus {more}")
            break
    row = work.row_tokens
    while row > 512:
        row //= 2
        shorter = replace(work, row_tokens=row, doc_length=min(work.doc_length, row))
        if any(p.fits for p in search(shape, shorter, gpu, gpus, per_node, backends, forced)):
            hints.append(f"rows of {row} tokens (packing.max_tokens / data.max_seq_len)")
            break
    if gpu.name != "h200-141gb" and smallest.memory["total"] <= GPUS["h200-141gb"].memory_bytes:
        hints.append("--gpu h200-141gb")
    hints.append("LoRA (trains adapters only: no full gradients or Adam states)")
    return ConfigError(f"{source}: nothing fits {gpus} x {gpu.name} ({gib(gpu.memory_bytes)} GiB): the smallest "
                       f"layout ({smallest.layout.describe()}) needs {gib(smallest.memory['total'])} GiB per GPU; it "
                       f"would fit with " + " or ".join(hints))


def write_layout(config_path: Path, plan: Plan) -> None:
    """Set the plan's parallel.* (and train.micro_batch / activation_checkpointing) keys in the YAML file, keeping
    every other key; written to a temporary file and renamed (comments are not kept)."""
    import yaml

    raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    lay = plan.layout
    parallel = raw.setdefault("parallel", {})
    parallel.update(backend=lay.backend)
    if lay.backend == "hf":
        parallel.update(data_parallel=lay.data_parallel)
    else:
        parallel.update(tensor_parallel=lay.tp, pipeline_parallel=lay.pp, virtual_pipeline_parallel=lay.vpp,
                        sequence_parallel=lay.tp > 1, context_parallel=lay.cp, distributed_optimizer=lay.dist_opt)
    train = raw.setdefault("train", {})
    train.update(micro_batch=lay.micro_batch, activation_checkpointing=1 if lay.checkpoint else 0)
    tmp = config_path.with_name(f".{config_path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    os.replace(tmp, config_path)


VLLM_MISSING = "grpo.rollout.engine: 'vllm' needs the vllm package"


def load_for_plan(path: str, overrides: list[str]):
    """(Config, rollout engine override): a GRPO config naming vLLM is planned on machines without vllm too (the
    config check refuses it there; it is re-read with engine hf and planned as vllm)."""
    from nova_rt.config import load_config

    try:
        return load_config(path, overrides), ""
    except ConfigError as exc:
        if VLLM_MISSING not in str(exc):
            raise
    return load_config(path, [*overrides, "grpo.rollout.engine=hf"]), "vllm"


def main(argv: list[str] | None = None) -> int:
    from nova_rt.config import resolve_path

    ap = argparse.ArgumentParser(prog="nova-rt plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default="h100-80gb", help=f"one of {', '.join(GPUS)}")
    ap.add_argument("--backend", choices=("any", "hf", "megatron"), default="any")
    for name in ("tp", "pp", "cp"):
        ap.add_argument(f"--{name}", type=int, default=0, help=f"force this {name.upper()} size")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the plans as JSON")
    ap.add_argument("--write", action="store_true", help="write the best layout into the config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    gpu = gpu_named(args.gpu)
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"--gpus {args.gpus} / --gpus-per-node {args.gpus_per_node}: must be >= 1")
    per_node = min(args.gpus_per_node, args.gpus)
    cfg, engine = load_for_plan(args.config, args.overrides)
    shape = load_shape(resolve_path(cfg, cfg.model.path), cfg.model.tiny)
    work = workload(cfg)
    if engine:
        work = replace(work, rollout_engine=engine)
    forced = {key: value for key, value in (("tp", args.tp), ("pp", args.pp), ("cp", args.cp)) if value}
    if forced:
        check_layout(shape, args.tp or 1, args.pp or 1, 0, args.cp or 1, args.gpus,
                     " ".join(f"--{k} {v}" for k, v in forced.items()))
    backends = ("hf", "megatron") if args.backend == "any" else (args.backend,)
    if forced and any(value > 1 for value in forced.values()):
        backends = tuple(b for b in backends if b == "megatron")
    plans = search(shape, work, gpu, args.gpus, per_node, backends, forced)
    fitting = [p for p in plans if p.fits]
    if not fitting:
        raise no_fit_error(plans, shape, work, gpu, args.gpus, per_node, backends, forced, args.config)
    best = fitting[:max(args.top, 1)]
    if args.json:
        print(json.dumps({"model": asdict(shape), "workload": asdict(work), "gpu": asdict(gpu), "gpus": args.gpus,
                          "plans": [{"layout": asdict(p.layout), "describe": p.layout.describe(), "memory": p.memory,
                                     "timing": asdict(p.timing)} for p in best]}, indent=1))
    else:
        print(render(best, shape, work, gpu, args.gpus))
    if args.write:
        write_layout(Path(args.config), best[0])
        print(f"wrote {best[0].layout.describe()} into {args.config}", file=sys.stderr)
    return 0
