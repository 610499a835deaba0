"""The planner's static memory (parameters, gradients, optimizer states per rank) equals, byte for byte, what the
backends allocate: megatron (TP / PP / VPP / DP, plain and distributed optimizer, tied and untied embeddings) and the
HF backend (DDP and FSDP2, fp32 and pure bf16 master weights), on CPU over gloo in one torchrun launch of 4 ranks.

What is counted (tests/plan/static_worker.py): after one optimizer step, every distinct storage of the model's
parameters, of their gradients (megatron: its fp32 main_grad buffers) and of the optimizer's parameters and states
(fp32 main copies, Adam moments, torch AdamW's step counters), each storage once. megatron runs through the test-only
CPU shims of tests/parallel, in fp32 and in bf16 (Float16OptimizerWithFloat16Params and the distributed optimizer's
bf16 path build on CPU with shims 5 and 6, which only answer a CUDA type name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nova_rt.models.tiny import save_tiny_model
from nova_rt.plan.memory import hf_static, megatron_static
from nova_rt.plan.shapes import load_shape

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "plan" / "static_worker.py"
MODELS = {  # vocab not a multiple of TP (padding); tied qwen2 with qkv bias: PP > 1 keeps a copy of the embedding
    "qwen2": dict(vocab_size=299, hidden=64, heads=4, kv_heads=2, intermediate=96, layers=8, tie=True),
    "llama": dict(vocab_size=301, hidden=48, heads=4, kv_heads=2, intermediate=80, layers=4, tie=False),
}
MEGATRON = {
    "tp2_pp2": {"tensor_parallel": 2, "pipeline_parallel": 2},
    "pp2_dp2_distopt": {"pipeline_parallel": 2, "distributed_optimizer": True},
    "tp2_dp2_distopt": {"tensor_parallel": 2, "distributed_optimizer": True},
    "dp4_distopt": {"distributed_optimizer": True},
    "pp4_vpp2": {"pipeline_parallel": 4, "virtual_pipeline_parallel": 2},
    "dp4": {},
    "cp2_dp2_distopt": {"context_parallel": 2, "distributed_optimizer": True},  # shards over DP x CP = 4
}
MEGATRON_BF16 = {  # model.dtype bfloat16: Float16OptimizerWithFloat16Params / the distributed optimizer's bf16 path
    "tp2_pp2_bf16": {"tensor_parallel": 2, "pipeline_parallel": 2},
    "tp2_dp2_distopt_bf16": {"tensor_parallel": 2, "distributed_optimizer": True},
}
HF = {
    "ddp_fp32": {"data_parallel": "ddp", "dtype": "float32", "master_weights": "fp32"},
    "fsdp2_fp32": {"data_parallel": "fsdp2", "dtype": "float32", "master_weights": "fp32"},
    "fsdp2_bf16": {"data_parallel": "fsdp2", "dtype": "bfloat16", "master_weights": "model_dtype"},
    "ddp_bf16": {"data_parallel": "ddp", "dtype": "bfloat16", "master_weights": "model_dtype"},
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("plan_static")
    dirs = {arch: save_tiny_model(tmp / arch, "llama" if arch == "llama" else "qwen2", **kw)
            for arch, kw in MODELS.items()}
    scenarios = [{"name": f"qwen2_{name}", "backend": "megatron", "parallel": parallel}
                 for name, parallel in MEGATRON.items()]
    scenarios += [{"name": f"qwen2_{name}", "backend": "megatron", "parallel": parallel, "dtype": "bfloat16"}
                  for name, parallel in MEGATRON_BF16.items()]
    scenarios += [{"name": "llama_tp2_pp2_distopt", "backend": "megatron", "model": str(dirs["llama"]),
                   "parallel": {"tensor_parallel": 2, "pipeline_parallel": 2, "distributed_optimizer": True}}]
    scenarios += [{"name": f"{arch}_{name}", "backend": "hf", "model": str(dirs[arch]), **sc}
                  for arch in MODELS for name, sc in HF.items()]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp), "model": str(dirs["qwen2"]), "scenarios": scenarios}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone", str(WORKER), str(spec)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n" + proc.stderr[-6000:])
    return tmp, dirs


def _ranks(tmp: Path, name: str) -> list[dict]:
    return [json.loads((tmp / f"{name}.rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("name", [*MEGATRON, *MEGATRON_BF16, "tp2_pp2_distopt"])
def test_megatron_static_bytes_exact(measured, name):
    tmp, dirs = measured
    arch = "llama" if name == "tp2_pp2_distopt" else "qwen2"
    shape = load_shape(str(dirs[arch]))
    parallel = {**MEGATRON, **MEGATRON_BF16}.get(name, {"tensor_parallel": 2, "pipeline_parallel": 2,
                                                          "distributed_optimizer": True})
    param_bytes = 2 if name in MEGATRON_BF16 else 4
    tp, pp = parallel.get("tensor_parallel", 1), parallel.get("pipeline_parallel", 1)
    vpp = parallel.get("virtual_pipeline_parallel", 0)
    for rank, got in enumerate(_ranks(tmp, f"{arch}_{name}")):
        assert got["dpcp_size"] == got["dp_size"] * parallel.get("context_parallel", 1)
        # megatron DDP reduces gradients, and its distributed optimizer shards them, over the DP x CP group
        want = megatron_static(shape, tp, pp, vpp, got["dpcp_size"], parallel.get("distributed_optimizer", False),
                               param_bytes, got["stage"], got["dpcp_rank"])
        predicted = {"params": want.params, "grads": want.grads, "optimizer": want.optimizer}
        assert predicted == {k: got[k] for k in predicted}, f"{name} rank {rank} (stage {got['stage']}, dp rank " \
                                                            f"{got['dp_rank']}): predicted {predicted}, measured {got}"


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("name", list(HF))
def test_hf_static_bytes_exact(measured, arch, name):
    tmp, dirs = measured
    shape = load_shape(str(dirs[arch]))
    sc = HF[name]
    param_bytes = 2 if sc["master_weights"] == "model_dtype" else 4
    for rank, got in enumerate(_ranks(tmp, f"{arch}_{name}")):
        want = hf_static(shape, got["dp_size"], sc["data_parallel"], param_bytes, got["dp_rank"])
        predicted = {"params": want.params, "grads": want.grads, "optimizer": want.optimizer}
        assert predicted == {k: got[k] for k in predicted}, f"{arch} {name} rank {rank}: predicted {predicted}, " \
                                                            f"measured {got}"
