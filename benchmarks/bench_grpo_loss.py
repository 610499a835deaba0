"""Benchmark grpo_loss forward and forward+backward: nova_rt Triton vs the eager torch path vs torch.compile of it.

Throughput is reported from the minimal bytes a fused op must move, per token: read logprobs, old_logprobs,
ref_logprobs (3E) and write d logprobs (E) for fwd+bwd, 3E for fwd alone (E = element size), plus 4B for the rewards
and (B+1) x 4 or 8 for cu_seqlens. "% peak" divides by the HBM peak of the device (H100 SXM 3.35 TB/s, H200
4.8 TB/s). The Triton path itself moves 6E per token fwd+bwd: the backward is a separate pass that scales the
saved d logprobs by the upstream gradient, so fwd+bwd can reach at most 4/6 of peak against this count;
"kernel_GB/s" (nova_rt only) uses the bytes the kernels really move (3E fwd, 6E fwd+bwd).
The realistic case (512 responses x mean 1k tokens) is a few MB and sits in L2 after the first rep, and its time is
mostly launch latency; the large case (16M tokens) is the one that measures HBM bandwidth.

Liger-Kernel's GRPO loss is not compared: it takes hidden states and the LM-head weight (or logits) and fuses the
log-prob computation, so no like-for-like input exists. Its `triton_grpo_loss` also needs (B, L, V) logits.

Usage: python benchmarks/bench_grpo_loss.py [--responses N --mean-len L --group-size G --dtype bf16|fp32|all]
On CPU (no CUDA) it runs a small case with the torch providers only (Triton would run in its interpreter).
Legend: T response tokens, B responses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import report, time_fn  # noqa: E402
from nova_rt.kernels.grpo_loss import grpo_loss, grpo_loss_torch  # noqa: E402

HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM parts
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
KW = dict(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", agg="token-mean", adv_norm="std")


def make_inputs(n_resp: int, mean_len: int, group_size: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Responses of length uniform in [1, 2 * mean_len - 1]; log-ratios in [-0.3, 0.3] so some tokens clip."""
    gen = torch.Generator().manual_seed(seed)
    len_B = torch.randint(1, 2 * mean_len, (n_resp,), generator=gen)
    cu = torch.zeros(n_resp + 1, dtype=torch.int32)
    cu[1:] = len_B.cumsum(0)
    T = int(cu[-1])
    lp = -3 * torch.rand(T, generator=gen)
    old = lp + 0.6 * torch.rand(T, generator=gen) - 0.3
    ref = lp + torch.randn(T, generator=gen) * 0.2
    to = lambda x, dt=dtype: x.to(device=device, dtype=dt)
    return dict(logprobs=to(lp).requires_grad_(), old_logprobs=to(old), ref_logprobs=to(ref),
                rewards=to(torch.randn(n_resp, generator=gen), torch.float32), cu_seqlens=cu.to(device),
                group_size=group_size)


def _side_bytes(inp: dict) -> int:
    B = inp["rewards"].numel()
    return B * 4 + (B + 1) * inp["cu_seqlens"].element_size()


def minimal_bytes(inp: dict, mode: str) -> int:
    """Read lp, old, ref (3E per token), plus write d logprobs (E) for fwd+bwd; plus rewards and cu_seqlens."""
    e = inp["logprobs"].element_size()
    return inp["logprobs"].numel() * (4 * e if mode == "fwd+bwd" else 3 * e) + _side_bytes(inp)


def kernel_bytes(inp: dict, mode: str) -> int:
    """Bytes the nova_rt Triton path actually moves: fwd 3E (no dlp write without grad), fwd+bwd 6E per token."""
    e = inp["logprobs"].element_size()
    return inp["logprobs"].numel() * (6 * e if mode == "fwd+bwd" else 3 * e) + _side_bytes(inp)


def providers(device: str) -> dict:
    out = {}
    if device == "cuda":
        out["nova_rt"] = lambda **kw: grpo_loss(**kw, impl="triton")
    out["torch"] = grpo_loss_torch
    out["torch_compile"] = torch.compile(grpo_loss_torch)
    return out


def bench_case(fn, inp: dict, mode: str, device: str) -> dict:
    lp = inp["logprobs"]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(**inp, **KW)[0]
        lp.grad = None
        loss, _ = fn(**inp, **KW)
        loss.backward()
        return loss

    return time_fn(step, device=device, warmup=3, reps=20 if device == "cuda" else 5)


def check_agreement(provs: dict, inp: dict) -> None:
    """All providers must give the same loss before any of them is timed."""
    ref_loss = grpo_loss_torch(**inp, **KW)[0].item()
    for name, fn in provs.items():
        got = fn(**inp, **KW)[0].item()
        assert abs(got - ref_loss) <= 1e-3 * (abs(ref_loss) + 1e-3), f"{name}: loss {got} vs torch {ref_loss}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--responses", type=int, nargs="*", default=None, help="B values (default: 512 and 4096 on GPU)")
    ap.add_argument("--mean-len", type=int, default=None, help="mean response length (default 1024 GPU, 256 CPU)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--dtype", default="all", choices=[*DTYPES, "all"])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; 1 by default: on a shared 2-core machine OpenMP spin-waits made 2-thread "
                         "timings swing 100x (0.4 ms to 165 ms for the same forward)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    cases = [(b, args.mean_len or 1024) for b in (args.responses or [512])]
    if on_gpu and args.responses is None:
        cases.append((4096, 4096))  # ~16M tokens: large enough to measure HBM rather than launch latency
    if not on_gpu:
        cases = [(b, args.mean_len or 256) for b in (args.responses or [64])]
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    dtypes = [d for d in dtypes if on_gpu or d == "fp32"] or ["fp32"]  # CPU: fp32 only
    peak = next((v for k, v in HBM_PEAK.items() if on_gpu and k in torch.cuda.get_device_name()), None)
    provs = providers(device)
    rows = []
    for n_resp, mean_len in cases:
        for dt in dtypes:
            inp = make_inputs(n_resp, mean_len, args.group_size, DTYPES[dt], device)
            check_agreement(provs, inp)
            T = inp["logprobs"].numel()
            for mode in ("fwd", "fwd+bwd"):
                nbytes = minimal_bytes(inp, mode)
                for name, fn in provs.items():
                    t = bench_case(fn, inp, mode, device)
                    gbs = nbytes / (t["ms"] * 1e-3) / 1e9
                    moved = kernel_bytes(inp, mode) / (t["ms"] * 1e-3) / 1e9 if name == "nova_rt" else float("nan")
                    rows.append({"provider": name, "mode": mode, "B": n_resp, "T": T, "dtype": dt, **t,
                                 "min_MB": nbytes / 2**20, "GB/s": gbs,
                                 "%peak": 100 * gbs * 1e9 / peak if peak else float("nan"),
                                 "kernel_GB/s": moved})
            del inp
    report("grpo_loss", rows, ["provider", "mode", "B", "T", "dtype", "ms", "ms_p20", "ms_p80", "min_MB", "GB/s",
                               "%peak", "kernel_GB/s", "peak_extra_mb"], out=args.out)
    print("liger: skipped (takes hidden states + LM head or (B, L, V) logits; no like-for-like input)")


if __name__ == "__main__":
    main()
