"""torchrun worker for tests/plan/test_static_memory.py: builds the backends for several layouts in one launch and
writes, per rank, the bytes each one actually holds after one optimizer step, counted by storage (each distinct
storage once): parameters, gradients, optimizer states (and fp32 main parameters that are not the model's).

    torchrun --nproc_per_node=4 tests/plan/static_worker.py SPEC.json

SPEC.json: {"out": dir, "model": HF dir, "scenarios": [{"name", "backend": "megatron", "parallel": {...}, "dtype"} |
            {"name", "backend": "hf", "data_parallel": "ddp"|"fsdp2", "dtype": .., "master_weights": ..}]}
Output: <out>/<name>.rank<R>.json {"params", "grads", "optimizer", "stage", "dp_rank", "dp_size"}.
On CPU the megatron shims (tests/parallel/megatron_cpu_shims.py) are applied first, as in tests/parallel.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class StorageCounter:
    """Sum of storage bytes, each storage counted once across all categories (the first one that sees it)."""

    def __init__(self):
        self.seen: set[int] = set()

    def count(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = _local(t).untyped_storage()
            if storage.data_ptr() in self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total


def _optimizer_tensors(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _megatron(sc: dict, model_dir: str, out: Path) -> None:
    from megatron.core import parallel_state as ps

    from nova_rt.config import ParallelConfig
    from nova_rt.parallel.megatron_trainer import MegatronTrainer

    pcfg = ParallelConfig(backend="megatron", **sc["parallel"])
    be = MegatronTrainer(model_dir, pcfg, dtype=getattr(torch, sc.get("dtype", "float32")), lr=1e-3, seed=0)
    ids = torch.arange(16) % 250 + 3
    row = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(16),
           "cu_seqlens": torch.tensor([0, 16], dtype=torch.int32)}
    be.train_step([row] * max(2, pcfg.pipeline_parallel))
    params = [p for chunk in be.model for p in chunk.parameters()]
    counter = StorageCounter()
    result = {"params": counter.count(params),
              "grads": counter.count(getattr(p, "main_grad", None) for p in params),
              "optimizer": counter.count(_optimizer_tensors(be.optimizer)),
              "stage": ps.get_pipeline_model_parallel_rank(), "dp_rank": be.dp_rank, "dp_size": be.dp_size,
              "dpcp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
              "dpcp_size": ps.get_data_parallel_world_size(with_context_parallel=True)}
    (out / f"{sc['name']}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    del be
    gc.collect()
    ps.destroy_model_parallel()


def _hf(sc: dict, model_dir: str, out: Path) -> None:
    from nova_rt.backends.hf import load_policy
    from nova_rt.config import build_config
    from nova_rt.distributed import DistInfo
    from nova_rt.models.causal import CausalLMLogprobs
    from nova_rt.trainer import Trainer

    cfg = build_config({"model": {"path": model_dir, "dtype": sc["dtype"], "master_weights": sc["master_weights"]},
                        "train": {"precision": "auto"},
                        "parallel": {"backend": "hf", "data_parallel": sc["data_parallel"]}}, "<test>")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    hf, _ = load_policy(cfg, trainable=True)
    trainer = Trainer(cfg, info, CausalLMLogprobs(hf), run_dir=out / f"run_{sc['name']}")
    ids = (torch.arange(16) % 250 + 3)[None]
    out_lp = trainer.model(ids, torch.arange(16)[None], torch.tensor([0, 16], dtype=torch.int32), 16, ids[0])
    out_lp["logprobs"].sum().backward()
    params = list(trainer.raw.parameters())
    counter = StorageCounter()
    result = {"params": counter.count(params), "grads": counter.count(p.grad for p in params)}
    trainer.optimizer.step()
    result["optimizer"] = counter.count(_optimizer_tensors(trainer.optimizer))
    result.update(stage=0, dp_rank=rank, dp_size=world)
    (out / f"{sc['name']}.rank{rank}.json").write_text(json.dumps(result))
    del trainer
    gc.collect()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    if any(sc["backend"] == "megatron" for sc in spec["scenarios"]):
        from tests.parallel import megatron_cpu_shims

        megatron_cpu_shims.apply()
        megatron_cpu_shims.check()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for sc in spec["scenarios"]:
        (_megatron if sc["backend"] == "megatron" else _hf)(sc, sc.get("model", spec["model"]), out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
