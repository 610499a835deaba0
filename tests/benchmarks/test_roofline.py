"""benchmarks/roofline.py against hand-counted FLOPs and bytes on small shapes, and the GPU suite's plan."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import gpu_suite, roofline  # noqa: E402


def test_attention_counts_by_hand():
    # docs of 3 and 1 tokens, causal: pairs 3*4/2 + 1 = 7; 2 heads, head dim 4: fwd 4 * 4 * 2 * 7 = 224
    c = roofline.attention_cost([3, 1], n_heads=2, kv_heads=1, head_dim=4, mode="fwd", elem=2)
    assert c["flops"] == 224
    # T=4: q = out = 4*2*4*2 = 64 B, k = v = 4*1*4*2 = 32 B, lse 4*2*4 = 32 B -> read q,k,v + write out, lse
    assert c["bytes"] == 64 + 32 + 32 + 64 + 32
    bwd = roofline.attention_cost([3, 1], 2, 1, 4, "bwd", elem=2)
    assert bwd["flops"] == 2.5 * 224
    # read q, out, dO (3 x 64), k, v (2 x 32), lse (32); delta written and read (64); write dq (64), dk, dv (64)
    assert bwd["bytes"] == 3 * 64 + 64 + 32 + 64 + 64 + 64
    full = roofline.attention_cost([2], 1, 1, 4, "fwd", causal=False)
    assert full["flops"] == 4 * 4 * 1 * 4  # L^2 = 4 pairs


def test_logprobs_counts_by_hand():
    c = roofline.logprobs_cost(T=2, D=3, V=5, elem=2, chunks=3)
    assert c["flops"] == 6 * 2 * 3 * 5 and c["flops_executed"] == 8 * 2 * 3 * 5
    hw = (2 * 3 + 5 * 3) * 2  # hidden + weight, bf16
    assert c["bytes"] == 3 * hw + 16 * 2
    assert c["bytes_design"] == c["bytes"] + 6 * 2 * 3 * 2  # 3 B read + 3 B written per T x D element, 2 carries


def test_logprobs_chunks_from_the_launcher_planner():
    # the docstring of fused_linear_logprobs_bwd: 198 chunks (Vc = 768) at T=16k, D=4096, V=152064, bf16
    assert roofline.logprobs_cost(16384, 4096, 152064)["chunks"] == 198


def test_grpo_and_merge_bytes_by_hand():
    c = roofline.grpo_cost(n_tokens=10, n_resp=2, elem=2, mode="fwd+bwd")
    side = 2 * 4 + 3 * 4  # rewards fp32, cu_seqlens int32
    assert c["bytes"] == 10 * 4 * 2 + side and c["bytes_design"] == 10 * 6 * 2 + side
    assert roofline.grpo_cost(10, 2, 4, "fwd")["bytes"] == 10 * 3 * 4 + side
    m = roofline.merge_cost(100, n_models=3)
    assert m["bytes"] == (3 * 2 + 2) * 100 and m["bytes_pcie"] == 6 * 100


def test_time_at_peak_takes_the_binding_resource():
    h100 = roofline.DEVICES["H100"]
    t, bound = roofline.time_at_peak(dict(flops=h100["flops"], bytes=h100["hbm"] / 2), "H100")
    assert (t, bound) == (pytest.approx(1.0), "compute")
    t, bound = roofline.time_at_peak(dict(flops=0.0, bytes=roofline.DEVICES["H200"]["hbm"] * 2), "H200")
    assert (t, bound) == (pytest.approx(2.0), "HBM")
    t, bound = roofline.time_at_peak(dict(flops=0.0, bytes=1.0, bytes_pcie=roofline.PCIE_GEN5_X16), "H100", pcie=True)
    assert (t, bound) == (pytest.approx(1.0), "PCIe")
    assert roofline.DEVICES["H100"]["hbm"] == 3.35e12 and roofline.DEVICES["H200"]["hbm"] == 4.8e12


def test_gpu_suite_plan_fits_nine_minutes(capsys):
    assert gpu_suite.dry_run(gpu_suite.BUDGET_S, None) == 0
    out = capsys.readouterr().out
    assert "fits" in out and gpu_suite.BUDGET_S <= 540
    names = [s.name for s in gpu_suite.STEPS]
    assert names == ["env", "gpu_tests", "attention", "logprobs", "grpo_loss", "merge", "sft_mfu"]
    assert sum(s.est_s for s in gpu_suite.STEPS) <= gpu_suite.BUDGET_S
    assert gpu_suite.dry_run(100, None) == 1  # a plan over budget says so


@pytest.mark.slow
def test_model_table_at_the_goal_shapes():
    rows = roofline.model_rows()
    ops = {r["op"] for r in rows}
    assert ops == {"packed_attention", "fused_linear_logprobs", "grpo_loss", "merge", "sft_step"}
    merge = next(r for r in rows if r["op"] == "merge")
    assert 7.5e9 < merge["flops"] / 6 < 7.7e9  # Qwen2-7B: 7.62B parameters, 2 FLOPs per input element
    assert all(r["H100_ms"] >= r["H200_ms"] > 0 for r in rows)
    assert "| op |" in roofline.table(rows)
