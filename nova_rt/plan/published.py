"""Published training runs with their hardware, and what the planner predicts for each (docs/plan.md's table).

    python -m nova_rt.plan.published        prints the table (markdown)

Each run is evaluated at its published layout, with the overlaps those frameworks use (DP, and TP where Transformer
Engine overlaps it) and their precision recipe; `predict` returns the planner's MFU (or HFU where the source counts
recompute) and whether the layout fits the GPU's memory. Sources and assumptions are in each row's `source`/`notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nova_rt.plan import memory
from nova_rt.plan.hardware import ALLOCATOR_RESERVE_BYTES, GPUS
from nova_rt.plan.search import Layout, Workload, evaluate
from nova_rt.plan.shapes import ModelShape
from nova_rt.plan.timing import step_time

LLAMA3_PAPER = "https://arxiv.org/abs/2407.21783 (Table 4)"
LLM_FOUNDRY = "https://github.com/mosaicml/llm-foundry/blob/main/scripts/train/benchmarking/README.md (H100 80GB BF16)"
MEGATRON_LM = "https://arxiv.org/abs/2104.04473 (Table 1 and abstract)"

LLAMA_405B = ModelShape("Llama-3.1-405B", 128256, 16384, 53248, 126, 128, 8, 128, False, False)
MEGATRON_1T = ModelShape("GPT-1T (Megatron-LM)", 51200, 25600, 4 * 25600, 128, 160, 160, 160, False, True, False)


def mpt(name: str, hidden: int, layers: int, heads: int) -> ModelShape:
    """MPT (llm-foundry): GPT-style MLP of 4 x hidden, multi-head attention, tied embeddings, vocab 50368."""
    return ModelShape(name, 50368, hidden, 4 * hidden, layers, heads, heads, hidden // heads, False, True, False)


@dataclass(frozen=True)
class Run:
    name: str
    shape: ModelShape
    gpu: str
    gpus: int
    layout: Layout
    seq: int
    global_rows: int
    published: float  # MFU (or HFU when `hardware_flops`), a fraction
    source: str
    hardware_flops: bool = False
    backend_recipe: str = "megatron"  # megatron | fsdp (HF-style FSDP with bf16 compute weights)
    recompute_published: bool = True  # False: the source does not say; the faster of the two that fits is taken
    notes: list[str] = field(default_factory=list)


RUNS = [
    Run("Llama 3 405B, 8k seq", LLAMA_405B, "h100-80gb", 8192,
        Layout("megatron", tp=8, pp=16, vpp=4, dp=64, micro_batch=1, dist_opt=True), 8192, 64 * 32, 0.43,
        LLAMA3_PAPER, recompute_published=False,
        notes=["VPP not given (4 assumed)", "126 layers over 16 stages: 7 a stage assumed"]),
    Run("Llama 3 405B, 8k seq, 16k GPUs", LLAMA_405B, "h100-80gb", 16384,
        Layout("megatron", tp=8, pp=16, vpp=4, dp=128, micro_batch=1, dist_opt=True), 8192, 128 * 16, 0.41,
        LLAMA3_PAPER, recompute_published=False, notes=["VPP not given (4 assumed)"]),
    Run("Llama 3 405B, 128k seq, CP16", LLAMA_405B, "h100-80gb", 16384,
        Layout("megatron", tp=8, pp=16, vpp=4, cp=16, dp=8, micro_batch=1, dist_opt=True), 131072, 8 * 16, 0.38,
        LLAMA3_PAPER, recompute_published=False, notes=["VPP not given (4 assumed)"]),
    Run("MPT-7B, 4k seq", mpt("MPT-7B", 4096, 32, 32), "h100-80gb", 8,
        Layout("hf", dp=8, micro_batch=16, checkpoint=True, data_parallel="fsdp2"), 4096, 256, 0.4042, LLM_FOUNDRY,
        backend_recipe="fsdp"),
    Run("MPT-13B, 2k seq", mpt("MPT-13B", 5120, 40, 40), "h100-80gb", 8,
        Layout("hf", dp=8, micro_batch=2, checkpoint=False, data_parallel="fsdp2"), 2048, 16, 0.3979, LLM_FOUNDRY,
        backend_recipe="fsdp"),
    Run("MPT-30B, 2k seq", mpt("MPT-30B", 7168, 48, 64), "h100-80gb", 8,
        Layout("hf", dp=8, micro_batch=3, checkpoint=True, data_parallel="fsdp2"), 2048, 504, 0.3811, LLM_FOUNDRY,
        backend_recipe="fsdp"),
    Run("MPT-70B, 2k seq", mpt("MPT-70B", 8192, 80, 64), "h100-80gb", 64,
        Layout("hf", dp=64, micro_batch=8, checkpoint=True, data_parallel="fsdp2"), 2048, 2048, 0.4257, LLM_FOUNDRY,
        backend_recipe="fsdp"),
    Run("Megatron-LM GPT 1T", MEGATRON_1T, "a100-80gb", 3072,
        Layout("megatron", tp=8, pp=64, dp=6, micro_batch=1, checkpoint=True), 2048, 3072, 0.52, MEGATRON_LM,
        hardware_flops=True, notes=["fp16 at the bf16 rate; HFU (counts the recompute)", "no VPP assumed"]),
]


@dataclass
class Prediction:
    run: Run
    layout: str
    utilization: float
    total_gib: float
    fits: bool

    @property
    def error(self) -> float:
        return self.utilization / self.run.published - 1


def predict(run: Run) -> Prediction:
    """The planner at the run's layout; recompute on and off where the source does not say (the faster that fits)."""
    if run.recompute_published:
        return _predict(run)
    both = [_predict(replace(run, layout=replace(run.layout, checkpoint=flag))) for flag in (False, True)]
    fitting = [p for p in both if p.fits]
    return max(fitting, key=lambda p: p.utilization) if fitting else min(both, key=lambda p: p.total_gib)


def _predict(run: Run) -> Prediction:
    gpu = GPUS[run.gpu]
    work = Workload("sft", run.seq, run.seq, run.global_rows, model_bytes=2, master_bytes=4, compute_bytes=2,
                    reference=False)
    if run.backend_recipe == "megatron":
        plan = evaluate(run.shape, work, gpu, run.gpus, 8, run.layout, overlap_dp=True, overlap_tp=True)
        total, timing = plan.memory["total"], plan.timing
    else:  # FSDP with bf16 compute weights: fp32 shards, bf16 activations (llm-foundry's amp_bf16 FULL_SHARD)
        lay = run.layout
        static = memory.hf_static(run.shape, lay.dp, "fsdp2", 4)
        tokens = lay.micro_batch * run.seq
        docs = [run.seq] * lay.micro_batch
        full, kept = (memory.hf_activation_bytes(run.shape, docs, tokens, param_bytes=2, compute_bytes=2,
                                                 checkpoint_every=every, attention="triton") for every in (0, 1))
        layer = (full - kept) // run.shape.layers
        activations = kept + layer if lay.checkpoint else full
        total = static.params + static.grads + static.optimizer + static.comm // 2 + activations
        total += ALLOCATOR_RESERVE_BYTES
        timing = step_time(shape=run.shape, gpu=gpu, gpus=run.gpus, gpus_per_node=8, tp=1, pp=1, vpp=0, cp=1,
                           dp=lay.dp, micro_batches=run.global_rows // (lay.dp * lay.micro_batch),
                           micro_batch_tokens=tokens, doc_length=run.seq, checkpoint=lay.checkpoint,
                           saved_bytes_per_layer_token=layer / tokens,
                           dp_bytes=8 * run.shape.total_params(), backend="hf")  # bf16 gathers, fp32 reduce
    utilization = timing.mfu * (4 / 3 if run.hardware_flops and run.layout.checkpoint else 1)
    return Prediction(run, run.layout.describe(), utilization, total / 1024**3, total <= gpu.memory_bytes)


def table() -> str:
    lines = ["| run | GPUs | layout | published | predicted | error | memory/GPU (GiB) | fits (published: yes) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in map(predict, RUNS):
        kind = "HFU" if p.run.hardware_flops else "MFU"
        name = p.run.name + (" (recompute: planner's pick)" if not p.run.recompute_published else "")
        lines.append(f"| {name} | {p.run.gpus} x {p.run.gpu} | {p.layout} | "
                     f"{kind} {100 * p.run.published:.1f}% | {100 * p.utilization:.1f}% | {100 * p.error:+.0f}% | "
                     f"{p.total_gib:.1f} | {'yes' if p.fits else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
