"""torchrun worker for the megatron backend tests: runs several scenarios in one launch (launches are expensive).

    torchrun --nproc_per_node=4 tests/parallel/megatron_worker.py SPEC.json

SPEC.json: {"out": dir, "data": file.pt (list over steps of lists of micro-batch dicts, the global batch),
            "scenarios": [{"name", "kind": "train"|"roundtrip", "model", "parallel": {...ParallelConfig fields},
                           "steps", "lr", "weight_decay", "grad_clip", "eps",
                           "save_initial"}]}
Writes, per scenario, <out>/<name>/stats.json (rank 0: losses, grad norms, tokens, the megatron optimizer classes,
and every rank's copy to check that all ranks agree), <out>/<name>/logprobs.pt (row 0 at the loaded weights),
<out>/<name>/hf/ (save_hf after training) and, with save_initial, <out>/<name>/hf_initial/ (save_hf right after
loading).
On CPU the megatron shims (tests/parallel/megatron_cpu_shims.py) are applied first; a missing shim target raises.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _setup():
    if not torch.cuda.is_available():
        from tests.parallel import megatron_cpu_shims

        megatron_cpu_shims.apply()
        megatron_cpu_shims.check()
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    else:
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")


def _run(sc: dict, data: list, out: Path) -> None:
    from megatron.core import parallel_state as ps

    from nova_rt.config import ParallelConfig
    from nova_rt.parallel.megatron_trainer import MegatronTrainer

    pcfg = ParallelConfig(backend="megatron", **sc["parallel"])
    be = MegatronTrainer(sc["model"], pcfg, dtype=torch.float32, lr=sc.get("lr", 1e-3),
                         weight_decay=sc.get("weight_decay", 0.0), grad_clip=sc.get("grad_clip", 1.0), seed=1234,
                         eps=sc.get("eps", 1e-8))
    target = out / sc["name"]
    chained = getattr(be.optimizer, "chained_optimizers", [be.optimizer])
    stats = {"steps": [], "optimizers": sorted({type(o).__name__ for o in chained})}
    if sc.get("save_initial"):  # HF round trip of the freshly loaded shards
        be.save_hf(target / "hf_initial")
    if sc["kind"] == "train":
        logp = be.logprobs(data[0][0])
        if dist.get_rank() == 0:
            target.mkdir(parents=True, exist_ok=True)
            torch.save(logp, target / "logprobs.pt")
        for step in range(sc["steps"]):
            rows = data[step][be.dp_rank :: be.dp_size]
            stats["steps"].append(be.train_step(rows))
    be.save_hf(target / "hf")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, stats)
    if dist.get_rank() == 0:
        (target / "stats.json").write_text(json.dumps({"rank0": stats, "all": everyone}, indent=1))
    del be
    gc.collect()
    ps.destroy_model_parallel()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    _setup()
    data = torch.load(spec["data"]) if spec.get("data") else None
    out = Path(spec["out"])
    for sc in spec["scenarios"]:
        _run(sc, data, out)
    if not torch.cuda.is_available():
        from tests.parallel import megatron_cpu_shims

        megatron_cpu_shims.check()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
