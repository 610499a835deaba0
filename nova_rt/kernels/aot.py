"""Compile every Triton kernel launch the project can make on CUDA for Hopper (sm_90a), on a machine without a GPU:
a launch that does not compile, spills or asks for too much shared memory would otherwise surface only on a user's
cluster. Triton's compiler needs no device: it lowers to PTX and runs its bundled `ptxas` (`-v`: registers, spills).

`launch_specs()` lists every (kernel, configuration) a launcher can choose on CUDA, read from the launchers' own
tables and specialised by Triton's launch binder as a real launch would be (pointers 16-byte aligned, model dims at
multiples of 16, per-batch sizes odd). `check_row` fails a launch that does not compile, needs over 227 KB of shared
memory, spills beyond its `_SPILL_ALLOWANCE`, or is a 16-bit matmul without `wgmma` (unless in `_MMA_V2_CONFIGS`).

    python -m nova_rt.kernels.aot [--workers 2] [--only packed_attention] [--json out.json]

prints the table (kernel, config, regs, spills, smem, tensor-core instruction, compile s) and exits 1 on a failed
check; compiles run in a process pool, TRITON_INTERPRET=0, fresh cache. More: docs/kernels.md#built-for-hopper-on-cpu.
Legend: T tokens, N query heads, K kv heads, H head dim, HP padded head dim, V vocab.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

SMEM_LIMIT_SM90 = 227 * 1024  # max shared memory per block on H100/H200 (232448 B, opt-in dynamic)
_TARGET = ("cuda", 90, 32)
_NQ, _NKV = 32, 8  # query / kv heads of the specialised strides (Llama-3-8B-like); G = 4
_T_ODD = 16383  # tokens: any pack length, so the general (not divisible by 16) binary
_N_SLOTS = 1037  # grid slots of the block table: any value


@dataclass
class LaunchSpec:
    """One kernel launch to compile: positional args by name (dtype -> pointer, int, float), constexprs, options."""
    op: str
    kernel: str  # attribute of nova_rt.kernels.<op>
    config: str  # human label: dtype, head dim, tiles, variant
    values: dict  # argument name -> torch.dtype (a pointer to it) | int | float
    constexprs: dict  # constexpr name -> value, plus num_warps / num_stages when the launcher passes them
    tensor_cores: bool = False  # 16-bit kernel with tl.dot: its PTX must hold wgmma (or mma.sync if mma_v2)
    mma_v2: bool = False  # listed in the op's _MMA_V2_CONFIGS
    spill_allowance: int = 0  # bytes of spill stores allowed (written next to the config)
    key: tuple = field(default=())


def _dtype_name(dt) -> str:
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[str(dt)]


# ----------------------------------------------------------------------------------------------- launch specs
def _attention_specs() -> list[LaunchSpec]:
    import torch

    from nova_rt.kernels import packed_attention as pa

    cuda = torch.device("cuda")
    specs = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        prec = "ieee" if dt == torch.float32 else "tf32"  # as packed_attention._common
        table = "fp32" if dt == torch.float32 else "16bit"
        # every head-dim key of the tile tables at H = HP, and H = 96 (HP 128) for the masked head-dim path (bf16,
        # fp32). H <= 32 (HP 16/32) launches the HP-64 entry with narrower tiles: less shared memory and fewer
        # registers than the HP-64 binary compiled here, so not compiled separately.
        for H in (64, 96, 128, 256) if dt != torch.float16 else (64, 128, 256):
            HP = max(16, 1 << (H - 1).bit_length())
            ints = dict(n_slots=_N_SLOTS, T=_T_ODD, stride_qt=_NQ * H, stride_kt=_NKV * H, stride_t=_NQ * H)
            ptrs = dict(Q=dt, K=dt, V=dt, OUT=dt, DO=dt, DK=dt, DV=dt, DQ=dt, LSE=torch.float32,
                        DELTA=torch.float32, CU=torch.int32, TABLE=torch.int32)
            floats = dict(qk_scale=0.127, sm_scale=0.088)
            bm_dq = pa._config("dq", HP, dt, cuda)[0]
            specs.append(LaunchSpec(
                "packed_attention", "_packed_attention_bwd_preprocess_kernel", f"{_dtype_name(dt)} H={H} BM={bm_dq}",
                {**ptrs, **ints, **floats}, dict(HEAD_DIM=H, HP=HP, BLOCK_M=bm_dq)))
            for kind, kern in (("fwd", "_packed_attention_fwd_kernel"), ("dkdv", "_packed_attention_bwd_dkdv_kernel"),
                               ("dq", "_packed_attention_bwd_dq_kernel")):
                bm, bn, warps, stages = pa._config(kind, HP, dt, cuda)
                key = (table, kind, max(64, HP))
                for causal in (True, False) if H == HP else (True,):
                    label = (f"{_dtype_name(dt)} H={H} {'causal' if causal else 'full'} {bm}x{bn} w{warps} "
                             f"s{stages}")
                    specs.append(LaunchSpec(
                        "packed_attention", kern, label, {**ptrs, **ints, **floats},
                        dict(G=_NQ // _NKV, HEAD_DIM=H, HP=HP, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, PREC=prec,
                             num_warps=warps, num_stages=stages),
                        tensor_cores=dt != torch.float32, mma_v2=key in pa._MMA_V2_CONFIGS,
                        spill_allowance=pa._SPILL_ALLOWANCE.get(key, 0), key=key))
    return specs


def _fused_logprobs_specs() -> list[LaunchSpec]:
    import torch

    from nova_rt.kernels import fused_linear_logprobs as fl

    tiles, specs, f32 = fl._CUDA_TILES, [], torch.float32
    D, V, VC, K = 4096, 152064, 768, 500
    ints = dict(T=_T_ODD, V=V, D=D, stride_h=D, stride_w=D, cols_per_split=32 * tiles["fwd"]["BLOCK_V"], K=K,
                VC=VC, v0=VC, stride_wv=D, stride_wd=1)
    floats = dict(inv_tau=1.0 / 0.7)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        n = _dtype_name(dt)
        ptrs = dict(H=dt, W=dt, LABELS=torch.int64, IDS=torch.int64, M_OUT=f32, S_OUT=f32, A_OUT=f32, ZL_OUT=f32,
                    OUT=f32, LSE=f32, C1=f32, GE=f32, GL=f32)
        vals = {**ptrs, **ints, **floats}
        fwd = tiles["fwd"]
        for ent in (False, True):
            specs.append(LaunchSpec(
                "fused_linear_logprobs", "_fused_linear_logprobs_fwd_kernel",
                f"{n} {fwd['BLOCK_T']}x{fwd['BLOCK_V']}x{fwd['BLOCK_D']} w{fwd['num_warps']} "
                f"s{fl._fwd_stages(dt)}{' entropy' if ent else ''}", vals,
                dict(fwd, HAS_ENT=ent, CAST_F32=dt == f32, num_stages=fl._fwd_stages(dt)),
                tensor_cores=dt != f32, spill_allowance=fl._SPILL_ALLOWANCE.get(("fwd", n), 0), key=("fwd", n)))
        g = tiles["gather"]
        specs.append(LaunchSpec("fused_linear_logprobs", "_fused_linear_logprobs_gather_kernel",
                                f"{n} K={K} {g['BLOCK_K']}x{g['BLOCK_D']}", vals, dict(g)))
        # dz is written in z's dtype, or into an fp32 row block when top-k one-hots follow (16-bit z)
        for dz_dt in (dt,) if dt == f32 else (dt, f32):
            for ent in (False, True):
                t = tiles["dz"]
                specs.append(LaunchSpec(
                    "fused_linear_logprobs", "_fused_linear_logprobs_bwd_kernel",
                    f"{n}->{_dtype_name(dz_dt)} {t['BLOCK_T']}x{t['BLOCK_V']}{' entropy' if ent else ''}",
                    {**vals, "Z": dt, "DZ": dz_dt}, dict(t, HAS_ENT=ent)))
        if dt != f32:  # the 24-bit d hidden accumulator exists for 16-bit inputs only
            h = tiles["dh"]
            for first in (True, False):
                for last in (True, False):
                    specs.append(LaunchSpec(
                        "fused_linear_logprobs", "_fused_linear_logprobs_dh_kernel",
                        f"{n} {h['BLOCK_T']}x{h['BLOCK_D']}x{h['BLOCK_V']} w{h['num_warps']} s{h['num_stages']}"
                        f"{' first' if first else ''}{' last' if last else ''}",
                        {**vals, "DZ": dt, "HI": torch.int16, "LO": torch.uint8, "DH": dt},
                        dict(h, FIRST=first, LAST=last, CAST_F32=False), tensor_cores=True))
    return specs


def _grpo_specs() -> list[LaunchSpec]:
    """Each BLOCK_B / BLOCK_T the launcher can pick (at the default variant), each constexpr variant (aggregation,
    advantage norm or given advantages, KL mode or no reference, token advantages, TIS weights, no gradient, each
    per-token loss mode) at the CUDA block size, per logprobs dtype, and int64 cu_seqlens (grpo_loss takes int32 or
    int64) at the default variant."""
    import torch

    from nova_rt.kernels import grpo_loss as gl

    specs, f32, bf16 = [], torch.float32, torch.bfloat16
    pow2 = lambda lo, hi: [1 << e for e in range(lo.bit_length() - 1, hi.bit_length())]  # noqa: E731
    base = dict(R_B=f32, GIVEN_B=f32, ADV_B=f32, W_B=f32, STATS=f32, PART_4P=f32, LOSS=f32, G=8, bessel=7.0,
                inv_tokens=1e-6, T=_T_ODD * 32 + 2, P=513, n_search=13, eps_low=0.2, eps_high=0.28, beta=0.04,
                CU=torch.int32)
    default_agg, default_norm = "token-mean", "std"
    adv = [(torch.int32, bb, default_agg, default_norm) for bb in pow2(*gl._BLOCK_B_RANGE)]
    bb_max = gl._BLOCK_B_RANGE[1]
    adv += [(torch.int32, bb_max, a, n) for a in gl._AGG_MODES for n in gl._ADV_NORMS if (a, n) != (default_agg,
                                                                                                    default_norm)]
    adv += [(torch.int64, bb_max, default_agg, default_norm)]
    adv += [(torch.int32, bb_max, a, "given") for a in gl._AGG_MODES]  # precomputed advantages
    for cu, bb, agg, norm in adv:
        specs.append(LaunchSpec(
            "grpo_loss", "_grpo_adv_kernel", f"{'cu64' if cu == torch.int64 else 'cu32'} BLOCK_B={bb} {agg} adv={norm}",
            {**base, "CU": cu, "B": bb * 3 // 4 + 1}, dict(AGG=gl._AGG_MODES[agg], NORM_STD=norm == "std",
                                                         HAS_GIVEN=norm == "given", BLOCK_B=bb),
            spill_allowance=gl._SPILL_ALLOWANCE.get(("adv", bb), 0), key=("adv", bb)))
    bt_max = gl._CUDA_BLOCK_T
    # (dtype, cu dtype, BLOCK_T, has_ref, kl, token_adv, write_grad, is_weights, loss mode)
    fwd = [(bf16, torch.int32, bt, True, "k3", False, True, False, "ppo_clip") for bt in pow2(16, bt_max)]
    for dt in (bf16, torch.float16, f32):
        fwd += [(dt, torch.int32, bt_max, True, kl, False, True, False, "ppo_clip") for kl in gl._KL_MODES
                if (dt, kl) != (bf16, "k3")]
        fwd += [(dt, torch.int32, bt_max, False, "k3", False, True, False, "ppo_clip"),  # no reference: no KL code
                (dt, torch.int32, bt_max, True, "k3", True, True, False, "ppo_clip"),
                (dt, torch.int32, bt_max, True, "k3", False, False, False, "ppo_clip"),
                (dt, torch.int64, bt_max, True, "k3", False, True, False, "ppo_clip"),
                (dt, torch.int32, bt_max, True, "k3", True, True, True, "ppo_clip")]  # all streams: TIS + token_adv
        # the other per-token modes (the sequence-level ones have no kernel), with every stream loaded
        fwd += [(dt, torch.int32, bt_max, True, "k3", True, True, True, mode) for mode in gl._LOSS_MODES
                if mode != "ppo_clip" and mode not in gl.SEQUENCE_MODES]
    for dt, cu, bt, has_ref, kl, tadv, grad, isw, mode in fwd:
        label = (f"{_dtype_name(dt)} {'cu64' if cu == torch.int64 else 'cu32'} BLOCK_T={bt} w{gl._FWD_WARPS} "
                 f"{'kl=' + kl if has_ref else 'no-ref'}{' token_adv' if tadv else ''}{' tis' if isw else ''}"
                 f"{'' if grad else ' no-grad'}{'' if mode == 'ppo_clip' else ' ' + mode}")
        vals = {**base, "CU": cu, "B": 4093, "LP_T": dt, "OLD_T": dt, "REF_T": dt, "DLP_T": dt,
                "TADV_T": f32 if tadv else dt, "ISW_T": f32 if isw else dt, "SEQ_B": f32, "tau_pos": 1.0,
                "tau_neg": 1.05}
        specs.append(LaunchSpec("grpo_loss", "_grpo_loss_fwd_kernel", label, vals,
                                dict(HAS_REF=has_ref, HAS_TADV=tadv, HAS_ISW=isw, KL=gl._KL_MODES[kl],
                                     LOSS_MODE=gl._LOSS_MODES[mode], WRITE_GRAD=grad, BLOCK_T=bt,
                                     num_warps=gl._FWD_WARPS),
                                spill_allowance=gl._SPILL_ALLOWANCE.get(("fwd", _dtype_name(dt)), 0),
                                key=("fwd", _dtype_name(dt))))
    specs.append(LaunchSpec("grpo_loss", "_grpo_reduce_kernel", f"BLOCK_P={gl._BLOCK_P}", base,
                            dict(BLOCK_P=gl._BLOCK_P)))
    return specs


_OPS = {"packed_attention": _attention_specs, "fused_linear_logprobs": _fused_logprobs_specs,
        "grpo_loss": _grpo_specs}


def launch_specs(only: str | None = None, match: str | None = None) -> list[LaunchSpec]:
    """Every launch configuration, in a fixed order (workers rebuild the list and compile by index); `only` keeps
    one op, `match` the specs whose "kernel [config]" contains that text."""
    specs = [s for op, make in _OPS.items() if only in (None, op) for s in make()]
    return [s for s in specs if match is None or match in f"{s.kernel} [{s.config}]"]


# ----------------------------------------------------------------------------------------------- compile
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _kernel_args(fn, spec: LaunchSpec) -> list:
    """Positional (non-constexpr) arguments in the kernel's order; a name missing from spec.values is an error, so
    the list follows signature changes or fails."""
    import torch
    from triton.runtime.jit import MockTensor

    args = []
    for p in fn.params:
        if p.is_constexpr:
            continue
        if p.name not in spec.values:
            raise KeyError(f"{spec.kernel}: no value for argument {p.name!r} in the launch spec")
        v = spec.values[p.name]
        args.append(MockTensor(v) if isinstance(v, torch.dtype) else v)
    return args


def compile_spec(spec: LaunchSpec) -> dict:
    """Compile one launch for sm_90a; returns its row (regs, spill bytes, smem, tensor-core instruction, seconds)."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    row = dict(op=spec.op, kernel=spec.kernel, config=spec.config, tensor_cores=spec.tensor_cores,
               mma_v2=spec.mma_v2, spill_allowance=spec.spill_allowance)
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(f"nova_rt.kernels.{spec.op}"), spec.kernel)
        target = GPUTarget(*_TARGET)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)  # what a launch runs
        bound, specialization, opts = binder(*_kernel_args(fn, spec), **spec.constexprs)
        options, signature, constexprs, attrs = fn._pack_args(backend, dict(spec.constexprs), bound, specialization,
                                                              opts)
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v goes to stdout: captured here
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row with the error, reported by check_row
        row.update(error=f"{type(e).__name__}: {str(e)[-2000:]}", seconds=time.perf_counter() - t0)
        return row
    text, ptx = log.getvalue(), compiled.asm["ptx"]
    spill, regs = _PTXAS_SPILL.search(text), _PTXAS_REGS.search(text)
    if spill is None or regs is None:
        row.update(error=f"no ptxas -v report in the compile log: {text[-500:]!r}")
    row.update(regs=int(regs.group(1)) if regs else None, stack=int(spill.group(1)) if spill else None,
               spill_stores=int(spill.group(2)) if spill else None, spill_loads=int(spill.group(3)) if spill else None,
               smem=int(compiled.metadata.shared), num_warps=compiled.metadata.num_warps,
               num_stages=compiled.metadata.num_stages,
               mma="wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "",
               seconds=time.perf_counter() - t0)
    return row


def check_row(row: dict) -> list[str]:
    """The failed checks of one compiled launch (empty when it passes)."""
    name = f"{row['kernel']} [{row['config']}]"
    if row.get("error"):
        return [f"{name}: does not compile: {row['error']}"]
    bad = []
    if row["smem"] > SMEM_LIMIT_SM90:
        bad.append(f"{name}: shared memory {row['smem']} B > {SMEM_LIMIT_SM90} B per block on sm_90")
    if row["spill_stores"] > row["spill_allowance"]:
        bad.append(f"{name}: {row['spill_stores']} B of register spill stores > allowance {row['spill_allowance']} B")
    if row["tensor_cores"]:
        want = "mma.sync" if row["mma_v2"] else "wgmma"
        if row["mma"] != want:
            bad.append(f"{name}: expected {want} (tensor cores) in the PTX, found {row['mma'] or 'no MMA'}")
    return bad


_SPECS: list[LaunchSpec] = []


def _worker_init(only: str | None, match: str | None) -> None:
    _SPECS[:] = launch_specs(only, match)


def _compile_index(i: int) -> dict:
    return compile_spec(_SPECS[i])


def compile_all(only: str | None = None, match: str | None = None, workers: int = 2) -> list[dict]:
    """Compile every launch spec in a pool of `workers` processes (TRITON_INTERPRET=0, fresh Triton cache)."""
    import multiprocessing as mp

    n = len(launch_specs(only, match))
    with tempfile.TemporaryDirectory(prefix="nova_aot_") as cache:
        env = {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # inherited by the spawned workers before they import triton
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init, initargs=(only, match)) as pool:
                return list(pool.map(_compile_index, range(n)))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def table(rows: list[dict]) -> str:
    """One markdown table: kernel, config, regs, spills (stores/loads B), smem, MMA instruction, compile seconds."""
    lines = ["| kernel | config | regs | spills (st/ld B) | smem (B) | mma | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['config']} | ERROR | | | | {r['seconds']:.1f} |")
            continue
        sp = f"{r['spill_stores']}/{r['spill_loads']}" + (f" (≤{r['spill_allowance']})" if r["spill_allowance"] else "")
        lines.append(f"| {r['kernel']} | {r['config']} | {r['regs']} | {sp} | {r['smem']} | {r['mma'] or '-'} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def summary(rows: list[dict], wall_s: float) -> dict:
    ok = [r for r in rows if not r.get("error")]
    return dict(configs=len(rows), compiled=len(ok), max_regs=max((r["regs"] for r in ok), default=0),
                configs_with_spills=sum(r["spill_stores"] > 0 for r in ok),
                max_spill_stores=max((r["spill_stores"] for r in ok), default=0),
                max_smem=max((r["smem"] for r in ok), default=0),
                wgmma=sum(r["mma"] == "wgmma" for r in ok), mma_sync=sum(r["mma"] == "mma.sync" for r in ok),
                compile_cpu_s=sum(r["seconds"] for r in rows), wall_s=wall_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(_OPS), default=None, help="one op's kernels")
    ap.add_argument("--match", default=None, help="only the launches whose 'kernel [config]' contains this")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None, help="write rows, summary and failures here")
    ap.add_argument("--list", action="store_true", help="list the launch configurations, compile nothing")
    args = ap.parse_args(argv)
    if args.list:
        for s in launch_specs(args.only, args.match):
            print(f"{s.kernel} [{s.config}]")
        return 0
    t0 = time.perf_counter()
    rows = compile_all(args.only, args.match, args.workers)
    wall = time.perf_counter() - t0
    print(table(rows))
    failures = [msg for r in rows for msg in check_row(r)]
    summ = summary(rows, wall)
    print(json.dumps(summ))
    for msg in failures:
        print("FAIL", msg, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summ, rows=rows, failures=failures), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
