"""Benchmark packed_attention: forward, backward and forward+backward over a pack of mixed-length documents.

Providers: nova_rt (Triton), torch (the eager torch path), torch_compiled (torch.compile of the torch path) and
flash_attn (flash_attn_varlen_func) when it imports. TFLOP/s come from an explicit count over the documents:
forward = 4 * H * N * sum_s pairs_s with pairs_s = L_s (L_s + 1) / 2 causal or L_s^2 otherwise (QK^T and PV),
backward = 2.5 x forward (five matmuls instead of two), as in flash-attention's benchmarks.
Default (CUDA): 16k tokens, bf16, 32 query heads, 8 kv heads, head dim 128. Without CUDA it runs a small fp32
configuration (2k tokens, 8/2 heads, head dim 64) with the torch providers only, and says so.

    python benchmarks/bench_packed_attention.py [--tokens 16384] [--q-heads 32] [--kv-heads 8] [--dim 128]
        [--dtype bf16] [--non-causal] [--out results.json]
Legend: T packed tokens, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._functorch.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report, time_fn  # noqa: E402
from nova_rt.kernels.packed_attention import packed_attention, packed_attention_torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def doc_lengths(T: int, seed: int) -> list[int]:
    """Mixed lengths: lognormal (median ~550 tokens, capped at 8k) with some 1-30 token fragments, summing to T."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < T:
        if torch.rand(1, generator=gen).item() < 0.15:
            lengths.append(int(torch.randint(1, 31, (1,), generator=gen)))
        else:
            lengths.append(min(8192, max(1, int(torch.empty(1).log_normal_(6.3, 1.0, generator=gen).item()))))
    lengths[-1] -= sum(lengths) - T
    return [L for L in lengths if L > 0]


def attention_flops(lengths: list[int], n_heads: int, head_dim: int, causal: bool, mode: str) -> float:
    pairs = sum(L * (L + 1) // 2 if causal else L * L for L in lengths)
    fwd = 4.0 * head_dim * n_heads * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def providers(device: str, causal: bool) -> dict:
    """name -> fn(q, k, v, cu, max_seqlen) for every provider that can run here."""
    fns = {"torch": lambda q, k, v, cu, m: packed_attention_torch(q, k, v, cu, m, causal=causal)}
    # bwd is timed with retain_graph=True, which compiled backwards refuse while they donate their buffers.
    torch._functorch.config.donated_buffer = False
    compiled = torch.compile(packed_attention_torch, dynamic=True)
    fns["torch_compiled"] = lambda q, k, v, cu, m: compiled(q, k, v, cu, m, causal=causal)
    if device != "cuda":
        print("no CUDA device: skipping the GPU providers nova_rt (Triton) and flash_attn")
        return fns
    fns = {"nova_rt": lambda q, k, v, cu, m: packed_attention(q, k, v, cu, m, causal=causal, impl="triton"),
           **fns}
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        print("flash_attn not importable: skipping it")
    else:
        fns["flash_attn"] = lambda q, k, v, cu, m: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=causal)
    return fns


def bench_provider(fn, q, k, v, cu, max_seqlen, device, reps) -> dict[str, dict]:
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    grad = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return fn(*inputs, cu, max_seqlen)

    out = fn(*inputs, cu, max_seqlen)

    def bwd():
        for x in inputs:
            x.grad = None
        out.backward(grad, retain_graph=True)

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        fn(*inputs, cu, max_seqlen).backward(grad)

    return {mode: time_fn(f, device=device, warmup=3, reps=reps)
            for mode, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd))}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    p.add_argument("--q-heads", type=int, default=32 if cuda else 8)
    p.add_argument("--kv-heads", type=int, default=8 if cuda else 2)
    p.add_argument("--dim", type=int, default=128 if cuda else 64)
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--reps", type=int, default=20 if cuda else 3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<name>_<device>_<date>.json)")
    args = p.parse_args()
    device, dtype, causal = ("cuda" if cuda else "cpu"), DTYPES[args.dtype], not args.non_causal

    lengths = doc_lengths(args.tokens, args.seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    T, N, K, H = args.tokens, args.q_heads, args.kv_heads, args.dim
    q, k, v = (torch.randn(T, n, H, generator=gen, device=device, dtype=dtype) for n in (N, K, K))
    print(f"T={T} documents={len(lengths)} (max {max(lengths)}, min {min(lengths)}) N={N} K={K} H={H} "
          f"{args.dtype} causal={causal} device={device}")

    rows, ms = [], {}
    shape = dict(tokens=T, docs=len(lengths), q_heads=N, kv_heads=K, dim=H, dtype=args.dtype, causal=causal)
    for name, fn in providers(device, causal).items():
        for mode, t in bench_provider(fn, q, k, v, cu, max(lengths), device, args.reps).items():
            tflops = attention_flops(lengths, N, H, causal, mode) / (t["ms"] * 1e-3) / 1e12
            ms[name, mode] = t["ms"]
            rows.append({**shape, "provider": name, "mode": mode, **t, "tflops": tflops})
    base = "flash_attn" if any(n == "flash_attn" for n, _ in ms) else "torch"
    for r in rows:
        r[f"speedup_vs_{base}"] = ms[base, r["mode"]] / r["ms"]
    cols = ["provider", "mode", "ms", "ms_p20", "ms_p80", "tflops", f"speedup_vs_{base}"]
    report(f"packed_attention_{args.dtype}", rows, cols + (["peak_extra_mb"] if cuda else []), out=args.out)


if __name__ == "__main__":
    main()
