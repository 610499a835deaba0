"""torchrun worker for tests/parallel/test_vocab_parallel.py: every rank runs nova_rt.parallel.vocab_parallel on its
column shard of each case's logits and saves what it got.

    torchrun --nproc_per_node=2 tests/parallel/vocab_parallel_worker.py CASES.pt OUT_DIR

CASES.pt: a list of {"logits": (T, V) float64 (the full matrix, same on every rank), "bounds": [0, b1, ..., V] shard
column ranges per rank, "vocab": real ids (columns past it are padding, masked here as MegatronTrainer does), "k",
"dtype": "float32" | "float64", "ids": (T, K) ids to evaluate, "grad": (T, K) upstream gradient}.
OUT_DIR/rank_<r>.pt: per case {"topk_ids", "topk_lp", "lp_at", "dlogits" (this rank's columns)}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _case(case: dict, rank: int) -> dict:
    from nova_rt.parallel.vocab_parallel import vocab_parallel_logprobs_at, vocab_parallel_topk

    lo, hi = case["bounds"][rank], case["bounds"][rank + 1]
    dtype = getattr(torch, case["dtype"])
    z_TV = case["logits"][:, lo:hi].to(dtype)
    pad = torch.arange(lo, hi) >= case["vocab"]
    z_TV = z_TV.masked_fill(pad, torch.finfo(dtype).min).requires_grad_()
    ids, lp = vocab_parallel_topk(z_TV.detach(), case["k"], vocab_start=lo, vocab_size=case["vocab"], group=None)
    lp_at = vocab_parallel_logprobs_at(z_TV, case["ids"], vocab_start=lo, group=None)
    (lp_at * case["grad"].to(dtype)).sum().backward()
    return {"topk_ids": ids, "topk_lp": lp, "lp_at": lp_at.detach(), "dlogits": z_TV.grad}


def main() -> None:
    cases = torch.load(sys.argv[1])
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.save([_case(c, rank) for c in cases], out / f"rank_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
