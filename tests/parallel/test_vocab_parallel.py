"""nova_rt.parallel.vocab_parallel on 2 gloo ranks against a single-process float64 reference over the full vocab.

Cases (one torchrun launch for all): V=37 split unevenly (19 + 18 columns) and split evenly with a padding column
(38 = 19 + 19, the last masked as MegatronTrainer masks padded vocab); k from 1 up to V, including k = V/TP, k close
to it and k > V/TP (a rank's whole shard is a candidate); logits with many exact ties (3 distinct values) where the
lowest ids must win; float64 and float32. Checked: top-k ids (exact; ties by lowest id, the same rule as the HF
path's reference_topk), top-k log-probs, log-probs at given ids (duplicates, ids on both shards), and the gradient
of a random contraction of them w.r.t. each rank's logits shard. Both ranks must return identical results.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nova_rt.kernels.topk_select import reference_topk
from tests.helpers import assert_close_verbose
from tests.parallel.run_helpers import ROOT, SEED, clean_env

T = 6


def _cases() -> list[dict]:
    gen = torch.Generator().manual_seed(SEED)
    cases = []
    layouts = {"uneven": ([0, 19, 37], 37), "padded": ([0, 19, 38], 37)}
    for kind in ("random", "ties"):
        for layout, (bounds, vocab) in layouts.items():
            for dtype in ("float64", "float32"):
                for k in (1, 10, 18, 19, 25, 37):
                    cols = bounds[-1]
                    z = torch.randn(T, cols, generator=gen, dtype=torch.float64) * 2.0
                    if kind == "ties":
                        z = torch.randint(0, 3, (T, cols), generator=gen).double()
                    z = z.to(getattr(torch, dtype)).double()  # the values the rank sees, exactly
                    ids = torch.randint(0, vocab, (T, 9), generator=gen)
                    ids[:, 0] = ids[:, 1]  # a duplicate id
                    cases.append({"name": f"{kind}/{layout}/{dtype}/k={k}", "logits": z, "bounds": bounds,
                                  "vocab": vocab, "k": k, "dtype": dtype, "ids": ids,
                                  "grad": torch.randn(T, 9, generator=gen, dtype=torch.float64)})
    return cases


def _reference(case: dict) -> dict:
    """float64, one process, the real columns only."""
    z = case["logits"][:, :case["vocab"]].clone().requires_grad_()
    lp_TV = torch.log_softmax(z, dim=1)
    order = torch.sort(z.detach(), dim=1, descending=True, stable=True).indices[:, :case["k"]]  # ties: lowest id
    lp_at = lp_TV.gather(1, case["ids"])
    (lp_at * case["grad"]).sum().backward()
    dz = torch.zeros_like(case["logits"])
    dz[:, :case["vocab"]] = z.grad
    return {"topk_ids": order, "topk_lp": lp_TV.detach().gather(1, order), "lp_at": lp_at.detach(), "dlogits": dz}


@pytest.mark.distributed
def test_vocab_parallel_topk_and_logprobs_match_float64_reference(tmp_path):
    print(f"seed={SEED}")
    cases = _cases()
    torch.save(cases, tmp_path / "cases.pt")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(ROOT / "tests" / "parallel" / "vocab_parallel_worker.py"), str(tmp_path / "cases.pt"),
                        str(tmp_path)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = [torch.load(tmp_path / f"rank_{rank}.pt") for rank in range(2)]
    for i, case in enumerate(cases):
        name, ref = f"seed={SEED} {case['name']}", _reference(case)
        a, b = got[0][i], got[1][i]
        for key in ("topk_ids", "topk_lp", "lp_at"):
            assert torch.equal(a[key], b[key]), f"{name}: ranks disagree on {key}"
        assert torch.equal(a["topk_ids"], ref["topk_ids"]), f"{name}: {a['topk_ids']} vs {ref['topk_ids']}"
        tol = 1e-12 if case["dtype"] == "float64" else 1e-5
        assert_close_verbose(a["topk_lp"], ref["topk_lp"], rtol=0, atol=tol, name=f"{name} topk log-probs")
        assert_close_verbose(a["lp_at"], ref["lp_at"], rtol=0, atol=tol, name=f"{name} log-probs at ids")
        bounds = case["bounds"]
        for rank in range(2):
            want = ref["dlogits"][:, bounds[rank]:bounds[rank + 1]]
            # dlogits of a row sum up to 9 upstream terms (|value| up to ~5): fp32 rounding scales with it
            assert_close_verbose(got[rank][i]["dlogits"], want, rtol=tol / 10, atol=tol / 10,
                                 name=f"{name} d logits on rank {rank}")


@pytest.mark.parametrize("V, k, cols", [(37, 2, 5), (64, 3, 16), (64, 40, 16)])  # chunks of max(cols, 4k) ids
def test_reference_topk_breaks_ties_by_lowest_id(V, k, cols, monkeypatch):
    """The HF path's reference_topk, streaming in chunks, keeps the lowest ids among equal logits: the rule the
    vocab-parallel top-k follows, so both backends pick the same ids."""
    from nova_rt.kernels import vocab_chunks

    monkeypatch.setattr(vocab_chunks, "chunk_cols", lambda *args: cols)
    gen = torch.Generator().manual_seed(SEED)
    weight = torch.randint(0, 3, (V, 1), generator=gen).double()  # logits = weight: three distinct values
    hidden = torch.ones(4, 1, dtype=torch.float64)
    ids, _ = reference_topk(hidden, weight, k)
    want = torch.sort((hidden @ weight.T), dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(ids, want), f"seed={SEED}: {ids[0].tolist()} vs {want[0].tolist()}"
