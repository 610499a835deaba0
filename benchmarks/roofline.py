"""Performance model: FLOPs and bytes of each op at its goal shape, and the time it would take at H100 / H200 peak.

What the GPU benchmarks (`benchmarks/gpu_suite.py`) should be read against. Time at peak = max(FLOPs / dense bf16
peak, bytes / HBM peak): a lower bound no kernel beats, so measured time / model time is the fraction of the
roofline reached. Peaks are datasheet numbers (SXM parts): 989 TFLOP/s dense bf16 (nova_rt.telemetry), HBM
3.35 TB/s (H100) / 4.8 TB/s (H200) (bench_grpo_loss.HBM_PEAK); the merge also crosses PCIe Gen5 x16 (64 GB/s
each way, datasheet) when the models live in host memory. FLOP counts are the ones the benchmarks report:

- packed attention (bench_packed_attention.attention_flops): forward 4 H N sum_s pairs_s (QK^T and PV; causal
  pairs_s = L_s (L_s + 1) / 2), backward 2.5 x forward. Bytes: forward reads q, k, v and writes out + lse; backward
  reads q, k, v, out, dO, lse, writes and reads delta, writes dq, dk, dv. Nothing quadratic touches HBM.
- fused log-probs: the work is 6 T D V (forward GEMM, d hidden, d weight; the benchmark's "effective" TFLOP/s);
  the kernel executes 8 T D V (it recomputes the logits GEMM in backward). Bytes: hidden and weight read once per
  pass, d hidden / d weight written, plus the 24-bit d hidden state the backward carries between vocab chunks (3 B
  read + 3 B written per T x D element per chunk; the chunk width from the launcher's own planner).
- grpo_loss: memory-bound; minimal bytes (bench_grpo_loss.minimal_bytes: 3E per token forward, 4E fwd+bwd) and the
  bytes the Triton path moves (kernel_bytes: 6E fwd+bwd).
- merge: linear merge of three models into one (bf16 in, bf16 out): (3 + 1) x 2 bytes per parameter through HBM, and
  3 x 2 bytes host -> device plus 2 bytes device -> host over PCIe when inputs come from host memory.
- SFT step: bench_train.model_flops (6 N tokens + causal attention over each packed document) at its 1B shape;
  bytes count only weights, gradients and fp32 AdamW state read and written once (activations not counted): the
  step is compute-bound either way, and time at peak is the 100%-MFU time.
The time column uses executed FLOPs (shown as "run" where they exceed the counted work).

    python benchmarks/roofline.py [--json out.json]
Legend: T tokens, N query heads, K kv heads, H head dim, D model dim, V vocab, E bytes per element.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_grpo_loss import HBM_PEAK, kernel_bytes, minimal_bytes  # noqa: E402
from benchmarks.bench_packed_attention import attention_flops, doc_lengths  # noqa: E402
from nova_rt.telemetry import PEAK_BF16_TFLOPS  # noqa: E402

PCIE_GEN5_X16 = 64e9  # bytes/s per direction, datasheet
DEVICES = {name: dict(flops=PEAK_BF16_TFLOPS[name] * 1e12, hbm=HBM_PEAK[name]) for name in ("H100", "H200")}

# Goals as docs/benchmarks.md's GPU table names them (a comparison where no number was set).
GOALS = {
    "packed_attention": "at least flash-attn varlen (FA2) TFLOP/s, fwd and bwd",
    "fused_linear_logprobs": "TFLOP/s vs Liger and eager; peak extra <= 2% of the bf16 logits (1.86% on meta)",
    "grpo_loss": ">= 85% of HBM peak (fwd; fwd+bwd <= 4/6 of it by design: 6E moved vs 4E minimal)",
    "merge": "nova-rt merge --device cuda vs plain copy bandwidth",
    "sft_step": "MFU (docs/benchmarks.md expects ~45-55% for Llama-3-8B at TP2xDP4)",
}


def attention_cost(lengths: list[int], n_heads: int, kv_heads: int, head_dim: int, mode: str, elem: int = 2,
                   causal: bool = True) -> dict:
    """FLOPs and minimal HBM bytes of packed attention over documents `lengths` (fwd, bwd or fwd+bwd)."""
    T = sum(lengths)
    q, kv, rows = T * n_heads * head_dim * elem, T * kv_heads * head_dim * elem, 4 * n_heads * T  # fp32 lse/delta
    fwd_bytes = 2 * q + 2 * kv + rows  # read q, k, v; write out, lse
    bwd_bytes = 3 * q + 2 * kv + rows + 2 * rows + q + 2 * kv  # read q, out, dO, k, v, lse; delta w+r; write dq dk dv
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
    return dict(flops=attention_flops(lengths, n_heads, head_dim, causal, mode), bytes=nbytes)


def _dh_chunks(T: int, D: int, V: int, elem: int) -> int:
    """Vocab chunks of the fused log-probs backward on CUDA, from the launcher's own planner (Triton, 16-bit)."""
    import torch

    from nova_rt.kernels import vocab_chunks

    ws = vocab_chunks.workspace_bytes(torch.device("cuda"), reserved=T * D if elem == 2 else 0)
    vc = vocab_chunks.plan(T, V, ws, elem, 0, 0)[0]
    return math.ceil(V / vc)


def logprobs_cost(T: int, D: int, V: int, elem: int = 2, chunks: int | None = None) -> dict:
    """Fused log-probs fwd+bwd: effective (6TDV) and executed (8TDV) FLOPs; minimal and design bytes."""
    hw = (T * D + V * D) * elem
    minimal = hw + 8 * T + 8 * T + hw + hw  # fwd: read h, W, labels, write logp/lse; bwd: read h, W; write dh, dW
    chunks = _dh_chunks(T, D, V, elem) if chunks is None else chunks
    state = 6 * T * D * max(chunks - 1, 0) if elem == 2 else 8 * T * D * max(chunks - 1, 0)
    return dict(flops=6.0 * T * D * V, flops_executed=8.0 * T * D * V, bytes=minimal, bytes_design=minimal + state,
                chunks=chunks)


def grpo_cost(n_tokens: int, n_resp: int, elem: int, mode: str = "fwd+bwd") -> dict:
    """GRPO loss bytes: minimal (what any fused op must move) and what the Triton kernels move; ~30 FLOPs/token."""
    import torch

    dt = {2: torch.bfloat16, 4: torch.float32}[elem]
    inp = dict(logprobs=torch.empty(n_tokens, dtype=dt, device="meta"),
               rewards=torch.empty(n_resp, dtype=torch.float32, device="meta"),
               cu_seqlens=torch.empty(n_resp + 1, dtype=torch.int32, device="meta"))
    return dict(flops=30.0 * n_tokens, bytes=minimal_bytes(inp, mode), bytes_design=kernel_bytes(inp, mode))


def merge_cost(n_params: int, n_models: int = 3, elem_in: int = 2, elem_out: int = 2) -> dict:
    """Linear merge: every input read once and the output written once (HBM), and the same over PCIe from host."""
    return dict(flops=2.0 * n_models * n_params, bytes=(n_models * elem_in + elem_out) * n_params,
                bytes_pcie=max(n_models * elem_in, elem_out) * n_params)  # H2D and D2H overlap (full duplex)


def qwen2_7b_params() -> int:
    """Parameters of Qwen2-7B (the merge goal's 7B model), counted on a meta-device model from its config."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def time_at_peak(cost: dict, device: str, pcie: bool = False) -> tuple[float, str]:
    """(seconds, bound) at the device's peaks: the larger of compute time and memory time (and PCIe time)."""
    peak = DEVICES[device]
    times = {"compute": cost.get("flops_executed", cost["flops"]) / peak["flops"],
             "HBM": cost["bytes"] / peak["hbm"]}
    if pcie:
        times["PCIe"] = cost["bytes_pcie"] / PCIE_GEN5_X16
    bound = max(times, key=times.get)
    return times[bound], bound


def model_rows() -> list[dict]:
    """One row per op and mode at the goal shapes."""
    rows = []
    lengths = doc_lengths(16384, seed=0)  # bench_packed_attention's default mix: 16k tokens of mixed documents
    for mode in ("fwd", "bwd", "fwd+bwd"):
        c = attention_cost(lengths, 32, 8, 128, mode)
        rows.append(dict(op="packed_attention", mode=mode, shape=f"T=16384 ({len(lengths)} docs) N=32 K=8 H=128 "
                         "bf16 causal", **c))
    c = logprobs_cost(16384, 4096, 152064)
    rows.append(dict(op="fused_linear_logprobs", mode="fwd+bwd", shape="T=16384 D=4096 V=152064 bf16", **c))
    for n_resp, mean_len in ((512, 1024), (4096, 4096)):
        for elem, name in ((2, "bf16"), (4, "fp32")):
            for mode in ("fwd", "fwd+bwd"):
                c = grpo_cost(n_resp * mean_len, n_resp, elem, mode)
                rows.append(dict(op="grpo_loss", mode=mode, shape=f"{n_resp}x{mean_len} tokens {name}", **c))
    p = qwen2_7b_params()
    rows.append(dict(op="merge", mode="linear", shape=f"3 x Qwen2-7B ({p / 1e9:.2f}B params) bf16", pcie=True,
                     **merge_cost(p)))
    rows.append(dict(op="sft_step", mode="fwd+bwd", shape="Llama 1B (bench_train 1b), 2 x 8192 packed tokens",
                     **sft_cost()))
    for r in rows:
        for dev in DEVICES:
            t, bound = time_at_peak(r, dev, pcie=r.get("pcie", False))
            r[f"{dev}_ms"], r["bound"] = t * 1e3, bound
            if r["op"] == "merge":  # the HBM-only time too: inputs already on the device
                r[f"{dev}_hbm_ms"] = r["bytes"] / DEVICES[dev]["hbm"] * 1e3
        r["intensity"] = r["flops"] / r["bytes"]
        r["goal"] = GOALS[r["op"]]
    return rows


def sft_cost(size: str = "1b", seq: int = 8192, n_rows: int = 2) -> dict:
    """Model FLOPs of one SFT step (bench_train's count); bytes: bf16 weights + grads + fp32 AdamW state once."""
    from benchmarks.bench_train import SIZES, model_flops, packed_rows

    cfg = SIZES[size]
    rows = packed_rows(n_rows, seq, cfg["vocab_size"])
    h, f, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv_dim = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    n_params = L * (2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h) + v * h + h  # tied embeddings
    return dict(flops=model_flops(cfg, rows), bytes=n_params * (2 + 2 + 12) * 2)  # read + write each state once


def table(rows: list[dict]) -> str:
    lines = ["| op | mode | shape | GFLOP | GB | FLOP/B | bound | H100 ms | H200 ms | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = ""
        if "bytes_design" in r:
            extra = f" ({r['bytes_design'] / 1e9:.3g} as built)"
        hbm = f" (HBM only {r['H100_hbm_ms']:.3g} / {r['H200_hbm_ms']:.3g})" if "H100_hbm_ms" in r else ""
        fl = f"{r['flops'] / 1e9:.4g}" + (f" ({r['flops_executed'] / 1e9:.4g} run)" if "flops_executed" in r else "")
        lines.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {fl} | {r['bytes'] / 1e9:.4g}"
                     f"{extra} | {r['intensity']:.3g} | {r['bound']} | {r['H100_ms']:.3g}{hbm} | {r['H200_ms']:.3g} | "
                     f"{r['goal']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = model_rows()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
