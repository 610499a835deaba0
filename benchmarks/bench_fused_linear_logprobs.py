"""Benchmark fused_linear_logprobs forward+backward against materialised-logits baselines.

Work: 6 T D V FLOPs (forward GEMM, d hidden GEMM, d weight GEMM); the fused backward also recomputes the logits
GEMM, which the "effective" TFLOP/s deliberately does not count. Memory: peak bytes above the inputs during one
fwd+bwd, with the gradients of hidden and weight (which every provider must produce) reported apart, and the
ratio of the rest to the eager logits tensor (T x V in the input dtype). Every row also carries the peak extra
memory of one fwd+bwd at the issue-3 target size (T=16384, D=4096, V=152064, the run's dtype), measured on meta
tensors (`meta_peak_extra`: nothing is allocated, so CPU runs report it too) against the bf16 eager logits (4.98 GB).
Legend: T tokens, D model dim, V vocab.

    python benchmarks/bench_fused_linear_logprobs.py                 # CUDA: T=16384 D=4096 V=152064; CPU: SmolLM2
    python benchmarks/bench_fused_linear_logprobs.py --T 512 --dtype float32 --providers torch,eager
    python benchmarks/bench_fused_linear_logprobs.py --meta       # only the target-size memory table (any machine)
Providers: triton (nova_rt, CUDA only), torch (nova_rt chunked PyTorch), eager (log_softmax of materialised
logits), compiled (torch.compile of eager), liger (LigerFusedLinearCrossEntropyLoss, sum reduction, if installed).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report, time_fn  # noqa: E402
from benchmarks.memory import LiveBytes, NoLaunch  # noqa: E402
from nova_rt.kernels import fused_linear_logprobs as fll_mod  # noqa: E402
from nova_rt.kernels import vocab_chunks  # noqa: E402
from nova_rt.kernels.fused_linear_logprobs import fused_linear_logprobs  # noqa: E402

TARGET_TDV = (16384, 4096, 152064)  # issue 3: peak extra <= 2% of the bf16 eager logits (T V 2 bytes) here
_KERNELS = ("_fused_linear_logprobs_fwd_kernel", "_fused_linear_logprobs_gather_kernel",
            "_fused_linear_logprobs_bwd_kernel", "_fused_linear_logprobs_dh_kernel")


def _eager_logprobs(h_TD, w_VD, labels_T):
    logits_TV = (h_TD @ w_VD.T).float()
    lp = torch.log_softmax(logits_TV, dim=-1).gather(1, labels_T.clamp_min(0)[:, None])[:, 0]
    return torch.where(labels_T != -100, lp, 0.0)


def _providers(names, device):
    compiled = torch.compile(_eager_logprobs, dynamic=False) if "compiled" in names else None
    table = {
        "triton": lambda h, w, y: fused_linear_logprobs(h, w, y, impl="triton")["logprobs"],
        "torch": lambda h, w, y: fused_linear_logprobs(h, w, y, impl="torch")["logprobs"],
        "eager": _eager_logprobs,
        "compiled": compiled,
    }
    if "liger" in names:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            print("liger_kernel not importable: skipping the liger provider")
        else:
            lce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            table["liger"] = lambda h, w, y: -lce(w, h, y)  # scalar: sum of label log-probs
    if device == "cpu":
        table.pop("triton")  # the interpreter is a correctness tool, not a provider
    return {n: table[n] for n in names if table.get(n) is not None}


class _CpuPeak:
    """Peak resident memory above the current level, via /proc/self/clear_refs (resets VmHWM) and VmHWM."""

    @staticmethod
    def _field(name: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.base = self._field("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak_extra_mb = self._field("VmHWM") - self.base


def _step(fn, h, w, y, g):
    out = fn(h, w, y)
    loss = out if out.dim() == 0 else (out * g).sum()
    return torch.autograd.grad(loss, (h, w))


def meta_peak_extra(T: int, D: int, V: int, dtype: torch.dtype, impl: str, kind: str = "cuda",
                    entropy: bool = False, K: int = 0, device: str = "meta") -> int:
    """Peak bytes fused_linear_logprobs allocates in one forward + backward beyond its inputs, its outputs (with the
    O(T) tensors saved for backward) and the two gradients, on meta tensors: full size, nothing allocated.

    Runs the op's own bodies (`_forward`, `fused_linear_logprobs_bwd`: on meta tensors the custom op would run its
    fake kernel) under `LiveBytes`, with the Triton kernels replaced by `NoLaunch` stubs (they allocate nothing:
    every buffer they touch is a torch tensor made by the launcher, so the launch structure allocates as on the GPU)
    and the device-dependent choices (workspace cap, fp32 GEMM output, SM count) made as on `kind`, "cuda" or "cpu".
    impl "eager": autograd through the materialised-logits baseline of this benchmark. device="cpu": the same
    on real (random) CPU tensors, to check the meta run against (the triton path needs TRITON_INTERPRET=1 then).
    """
    meta = dict(device=device)
    h, w = torch.randn(T, D, dtype=dtype, **meta), torch.randn(V, D, dtype=dtype, **meta) * D ** -0.5
    y = torch.randint(0, V, (T,), **meta)
    if impl == "eager":
        with LiveBytes() as mem:
            grads = _step(_eager_logprobs, h.requires_grad_(), w.requires_grad_(), y, torch.randn(T, **meta))
        return mem.peak_excluding(*grads)
    ids = torch.randint(0, V, (T, K), **meta) if K else None
    g_logp, g_ent = torch.randn(T, **meta), torch.randn(T, **meta) if entropy else None
    g_topk = torch.randn(T, K, **meta) if K else None
    use_triton = impl == "triton"
    with ExitStack() as stack:
        for name in _KERNELS if device == "meta" else ():
            stack.enter_context(mock.patch.object(fll_mod, name, NoLaunch()))
        stack.enter_context(mock.patch.object(vocab_chunks, "device_kind", lambda device: kind))
        stack.enter_context(mock.patch.object(fll_mod, "_sm_count", lambda device: 132 if kind == "cuda" else 1))
        with LiveBytes() as mem:
            outs = fll_mod._forward(h, w, y, ids, 1.0, entropy, use_triton)
            grads = fll_mod.fused_linear_logprobs_bwd(h, w, y, ids, outs[3], outs[4], g_logp, g_ent, g_topk, 1.0,
                                                      True, True, use_triton)
    for t in grads:  # no scratch hidden in a gradient's storage
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), "gradient storage larger than it"
    return mem.peak_excluding(*outs, *grads)


def _target_memory(impl: str, dtype: torch.dtype, kind: str, entropy: bool = False, K: int = 0) -> dict:
    T, D, V = TARGET_TDV
    extra = meta_peak_extra(T, D, V, dtype, impl, kind, entropy, K)
    return {"target_extra_mb": extra / 2**20, "target_vs_bf16_logits": extra / (T * V * 2)}


def run_meta(args) -> None:
    """Target-size peak extra memory of every impl/device/dtype/output combination (meta tensors)."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for impl, kind in (("triton", "cuda"), ("torch", "cuda"), ("torch", "cpu"), ("eager", "cpu")):
            for entropy, K in ((False, 0), (True, 0), (True, 500)) if impl != "eager" else ((False, 0),):
                res = _target_memory(impl, dtype, kind, entropy, K)
                rows.append({"provider": impl, "device": kind, "dtype": str(dtype)[6:], "entropy": entropy,
                             "K": K, "T": TARGET_TDV[0], "D": TARGET_TDV[1], "V": TARGET_TDV[2], **res})
    columns = ["provider", "device", "dtype", "entropy", "K", "target_extra_mb", "target_vs_bf16_logits"]
    report("fused_linear_logprobs_memory_meta", rows, columns, out=args.out)


def run(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    T, D, V = args.T, args.D, args.V
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(V, D, device=device, dtype=dtype, generator=gen) * D ** -0.5).requires_grad_()
    y = torch.randint(0, V, (T,), device=device, generator=gen)
    y[::7] = -100
    g = torch.randn(T, device=device, generator=gen)
    elem = torch.finfo(dtype).bits // 8
    logits_mb, grads_mb = T * V * elem / 2**20, (T + V) * D * elem / 2**20
    rows = []
    for name, fn in _providers(args.providers.split(","), device).items():
        step = lambda fn=fn: _step(fn, h, w, y, g)  # noqa: E731
        try:
            if device == "cpu":
                step()
                with _CpuPeak() as peak:
                    step()
                res = time_fn(step, device=device, warmup=1, reps=args.reps)
                res["peak_extra_mb"] = peak.peak_extra_mb
            else:
                res = time_fn(step, device=device, warmup=3, reps=args.reps)
        except torch.OutOfMemoryError:
            rows.append({"provider": name, "ms": float("nan"), "note": "OOM"})
            torch.cuda.empty_cache()
            continue
        extra = res["peak_extra_mb"] - grads_mb
        rows.append({"provider": name, "T": T, "D": D, "V": V, "dtype": args.dtype, **res,
                     "tflops": 6 * T * D * V / (res["ms"] * 1e-3) / 1e12, "grads_mb": grads_mb,
                     "extra_minus_grads_mb": extra, "extra_vs_logits": extra / logits_mb, "logits_mb": logits_mb})
        if name in ("triton", "torch", "eager"):
            rows[-1].update(_target_memory(name, dtype, "cuda" if name == "triton" else device))
    eager_ms = next((r["ms"] for r in rows if r["provider"] == "eager"), None)
    for r in rows:
        r["vs_eager"] = r["ms"] / eager_ms if eager_ms else float("nan")
    columns = ["provider", "dtype", "T", "D", "V", "ms", "ms_p20", "ms_p80", "tflops", "vs_eager", "peak_extra_mb",
               "extra_minus_grads_mb", "extra_vs_logits", "target_extra_mb", "target_vs_bf16_logits"]
    report(f"fused_linear_logprobs_{args.dtype}", rows, columns, out=args.out)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=16384 if cuda else 1024)
    p.add_argument("--D", type=int, default=4096 if cuda else 576)
    p.add_argument("--V", type=int, default=152064 if cuda else 49152)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--providers", default="triton,torch,eager,compiled,liger" if cuda else "torch,eager,compiled")
    p.add_argument("--reps", type=int, default=20 if cuda else 5)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<name>_<device>_<date>.json)")
    p.add_argument("--meta", action="store_true", help="only the target-size memory table, from meta tensors")
    args = p.parse_args()
    if not cuda:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    run_meta(args) if args.meta else run(args)


if __name__ == "__main__":
    main()
