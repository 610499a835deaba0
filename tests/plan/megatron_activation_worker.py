"""torchrun worker for tests/plan/test_megatron_activations.py: one optimizer step of the megatron backend per
scenario, in one launch, recording per rank the loss, the grad norm and the peak of the bytes autograd holds saved for
backward during the step; rank 0 also writes the weights after the step (HF names) to compare recompute on and off.

    torchrun --nproc_per_node=2 tests/plan/megatron_activation_worker.py SPEC.json

SPEC.json: {"out": dir, "model": HF dir, "scenarios": [{"name", "parallel": {...}, "recompute": k, "dtype",
            "rows": [[doc lengths], ...] (one packed row per micro-batch of every DP rank)}]}
Output: <out>/<name>.rank<R>.json {"loss", "grad_norm", "peak", "stage", "tp_rank", "dp_rank"}, <out>/<name>.pt.
Saved bytes are counted with torch.autograd.graph.saved_tensors_hooks: each saved tensor is wrapped in a handle at
pack time; a storage counts once while any handle to it lives (autograd drops the handles when the node's backward
has run), parameters excluded. The peak therefore covers every micro-batch in flight in the pipeline schedule and
the recomputed group inside backward. CPU: the megatron shims of tests/parallel (none of them changes what a layer
saves: they redirect device arguments, RNG state and type checks; see megatron_cpu_shims.py).
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class _Handle:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class LiveSaved:
    """Bytes of the distinct storages autograd holds for backward right now, and their peak."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= nbytes

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.params or not nbytes:
            return tensor
        handle = _Handle(tensor)
        if not self.refs.get(ptr):
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        weakref.finalize(handle, self._release, ptr, nbytes)
        return handle

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Handle) else packed


def _row(lengths: list[int], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(3, 250, (total,), generator=gen)
    labels = ids.clone()
    starts = torch.tensor([0, *lengths]).cumsum(0)
    labels[starts[:-1]] = -100  # a document's first token has no previous token
    return {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(n) for n in lengths]),
            "cu_seqlens": starts.to(torch.int32)}


def _run(sc: dict, spec: dict, out: Path) -> None:
    from megatron.core import parallel_state as ps

    from nova_rt.config import ParallelConfig
    from nova_rt.parallel.megatron_trainer import MegatronTrainer

    pcfg = ParallelConfig(backend="megatron", **sc["parallel"])
    trainer = MegatronTrainer(spec["model"], pcfg, dtype=getattr(torch, sc.get("dtype", "float32")), lr=1e-2, seed=0,
                              recompute_layers=sc.get("recompute", 0))
    rows = [_row(lengths, i) for i, lengths in enumerate(sc["rows"])]
    counter = LiveSaved(p for chunk in trainer.model for p in chunk.parameters())
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        result = trainer.train_step(rows)
    gc.collect()
    record = {"loss": result["loss"], "grad_norm": result["grad_norm"], "peak": counter.peak, "live": counter.live,
              "stage": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
              "dp_rank": trainer.dp_rank}
    (out / f"{sc['name']}.rank{dist.get_rank()}.json").write_text(json.dumps(record))
    weights = trainer.hf_state_dict()
    if dist.get_rank() == 0:
        torch.save(weights, out / f"{sc['name']}.pt")
    del trainer
    gc.collect()
    ps.destroy_model_parallel()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from tests.parallel import megatron_cpu_shims

    megatron_cpu_shims.apply()
    megatron_cpu_shims.check()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(spec["out"])
    for sc in spec["scenarios"]:
        _run(sc, spec, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
