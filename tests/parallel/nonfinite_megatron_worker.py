"""torchrun worker (2 processes, gloo, CPU shims) for tests/test_reliability_megatron.py: MegatronTrainer's
non-finite skip, step by step, in two layouts.

    torchrun --nproc_per_node=2 tests/parallel/nonfinite_megatron_worker.py SPEC.json

SPEC.json: {"model": dir, "out": dir}. Writes <out>/<layout>.json (rank 0): per step and per rank, whether the update
was skipped, whether every local parameter equals its value before the step, whether all are finite, the Adam step
count, and (lr inf at the end) what a checkpoint save and the final save did.

Faults are injected on rank 1 only, through the stage loss (`train_step(rows, loss_fn)`):
  - "inf_loss": loss + inf: the reported loss is inf on rank 1 alone, the gradients stay finite (under TP=2 the ranks
    do not reduce the loss, so only the global verdict can make rank 0 skip too);
  - "nan": loss * nan: NaN gradients, which the DP reduction spreads to every rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LAYOUTS = {"tp2": {"tensor_parallel": 2}, "dp2_distopt": {"distributed_optimizer": True}}
# step kind per step; then lr inf: an update that makes the parameters non-finite
STEPS = {"tp2": ["sft", "inf_loss", "nan", "sft"], "dp2_distopt": ["sft", "nan", "sft"]}


def _rows(step: int, vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(100 + step)
    rows = []
    for _ in range(2):
        T = 12
        ids = torch.randint(0, vocab, (T,), generator=gen)
        labels = ids.clone()
        labels[0] = -100
        rows.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(T),
                     "cu_seqlens": torch.tensor([0, T], dtype=torch.int32)})
    return rows


def _loss_fn(kind: str):
    def fn(out: dict, mb: dict):
        loss = -out["logprobs"].sum() / 24.0
        if dist.get_rank() == 1 and kind == "inf_loss":
            loss = loss + float("inf")  # value inf, gradient unchanged
        if dist.get_rank() == 1 and kind == "nan":
            loss = loss * float("nan")
        return loss, {}
    return fn


def _params(be) -> list[torch.Tensor]:
    return [p.detach().clone() for c in be.model for p in c.parameters()]


def _adam_step(be) -> float:
    for opt in be._megatron_optimizers():
        for state in opt.optimizer.state.values():
            return float(state["step"])
    return 0.0


def _record(be, before: list[torch.Tensor]) -> dict:
    after = _params(be)
    return {"skipped": be.update_skipped, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            "finite": all(bool(torch.isfinite(p).all()) for p in after), "adam_step": _adam_step(be)}


def _overflow_and_save(be, out: Path) -> dict:
    """lr inf: the update makes parameters non-finite; a checkpoint and the final model must then be refused."""
    from nova_rt.backends.megatron import save_megatron_final
    from nova_rt.config import build_config
    from nova_rt.distributed import DistInfo
    from nova_rt.errors import NonFiniteError
    from nova_rt.parallel import checkpoint as mckpt

    be.set_lr(float("inf"))
    before = _params(be)
    rows = _rows(99, be.arch.vocab)
    be.train_step(rows[be.dp_rank::be.dp_size])
    rec = _record(be, before)
    run_dir = out / f"run_{be.pcfg.tensor_parallel}"
    for what, save in [("checkpoint", lambda: mckpt.save(be, run_dir / "checkpoints", 5)),
                       ("final", lambda: save_megatron_final(build_config({}), DistInfo(), be, None, run_dir))]:
        try:
            save()
            rec[what] = "written"
        except NonFiniteError as exc:
            rec[what] = str(exc)
    dist.barrier()
    rec["files"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists() else []
    return rec


def _run(name: str, model: str, out: Path) -> None:
    from megatron.core import parallel_state as ps

    from nova_rt.config import ParallelConfig
    from nova_rt.parallel.megatron_trainer import MegatronTrainer

    be = MegatronTrainer(model, ParallelConfig(backend="megatron", **LAYOUTS[name]), dtype=torch.float32, lr=1e-2,
                         grad_clip=1.0, seed=1234)
    records = []
    for step, kind in enumerate(STEPS[name]):
        before = _params(be)
        rows = _rows(step, be.arch.vocab)[be.dp_rank::be.dp_size]
        stats = be.train_step(rows) if kind == "sft" else be.train_step(rows, _loss_fn(kind))
        records.append({"kind": kind, "loss": stats["loss"], "grad_norm": stats["grad_norm"], **_record(be, before)})
    records.append({"kind": "lr_inf", **_overflow_and_save(be, out)})
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(everyone, indent=1))
    del be
    ps.destroy_model_parallel()


def main() -> None:
    from tests.parallel import megatron_cpu_shims

    megatron_cpu_shims.apply()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    spec = json.loads(Path(sys.argv[1]).read_text())
    for name in LAYOUTS:
        _run(name, spec["model"], Path(spec["out"]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
