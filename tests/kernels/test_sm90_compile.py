"""Every Triton kernel launch the project can make on CUDA compiles for Hopper (sm_90a) on this CPU machine.

nova_rt/kernels/aot.py lists the launches from the launchers' own tables and compiles them with triton's bundled
ptxas; the slow test runs it over the whole matrix and fails on a compile error, shared memory over 227 KB, spills
beyond the allowance written next to a config, or a 16-bit matmul kernel without wgmma. The fast tests check that
the list covers every kernel and table entry, and that each check can fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nova_rt.kernels import aot
from nova_rt.kernels import fused_linear_logprobs as fl
from nova_rt.kernels import grpo_loss as gl
from nova_rt.kernels import packed_attention as pa

REPO = Path(__file__).resolve().parents[2]


def _jit_kernels(mod) -> set[str]:
    return {n for n, v in vars(mod).items()
            if n.endswith("_kernel") and type(v).__name__ in ("JITFunction", "InterpretedFunction")}


def test_specs_cover_every_kernel_and_table_entry():
    specs = aot.launch_specs()
    by_op = {op: {s.kernel for s in specs if s.op == op} for op in ("packed_attention", "fused_linear_logprobs",
                                                                   "grpo_loss")}
    for mod in (pa, fl, gl):
        name = mod.__name__.rsplit(".", 1)[1]
        assert _jit_kernels(mod) and _jit_kernels(mod) == by_op[name], name
    # packed attention: every (table, kind, head dim) entry, causal and not, per dtype
    keys = {s.key + (s.constexprs["CAUSAL"],) for s in specs if s.op == "packed_attention" and s.key}
    for table, configs in (("16bit", pa._CUDA_CONFIGS), ("fp32", pa._CUDA_CONFIGS_FP32)):
        for kind, entries in configs.items():
            for hp, cfg in entries.items():
                assert {(table, kind, hp, True), (table, kind, hp, False)} <= keys
                launched = [s for s in specs if s.op == "packed_attention" and s.key == (table, kind, hp)]
                assert all((s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["num_warps"],
                            s.constexprs["num_stages"]) == cfg for s in launched)
    for mod, keys in ((pa, pa._SPILL_ALLOWANCE.keys() | pa._MMA_V2_CONFIGS), (fl, fl._SPILL_ALLOWANCE.keys()),
                      (gl, gl._SPILL_ALLOWANCE.keys())):
        launched = {s.key for s in specs if s.op == mod.__name__.rsplit(".", 1)[1]}
        assert set(keys) <= launched, f"allowance for a config that is never launched: {set(keys) - launched}"
    # fused log-probs: the tile table entries, as launched
    for kind, kern in (("fwd", "fwd"), ("gather", "gather"), ("dz", "bwd"), ("dh", "dh")):
        launched = [s for s in specs if s.kernel == f"_fused_linear_logprobs_{kern}_kernel"]
        assert launched and all(s.constexprs.items() >= fl._CUDA_TILES[kind].items() for s in launched), kind
    # grpo: every BLOCK_B and BLOCK_T the launcher can pick
    block_b = {s.constexprs["BLOCK_B"] for s in specs if s.kernel == "_grpo_adv_kernel"}
    assert block_b == {1 << e for e in range(4, 11)} and (min(block_b), max(block_b)) == gl._BLOCK_B_RANGE
    block_t = {s.constexprs["BLOCK_T"] for s in specs if s.kernel == "_grpo_loss_fwd_kernel"}
    assert block_t == {1 << e for e in range(4, gl._CUDA_BLOCK_T.bit_length())}


def test_kernel_args_follow_the_signature():
    from triton.runtime.jit import JITFunction

    spec = aot.launch_specs(match="_grpo_reduce_kernel")[0]
    fn = JITFunction(gl._grpo_reduce_kernel.fn)  # the compiled form, also where the interpreter is on
    assert len(aot._kernel_args(fn, spec)) == len([p for p in fn.params if not p.is_constexpr])
    spec.values.pop("P")
    with pytest.raises(KeyError, match="'P'"):
        aot._kernel_args(fn, spec)


def _row(**kw):
    row = dict(kernel="k", config="c", regs=128, stack=0, spill_stores=0, spill_loads=0, smem=1024, mma="wgmma",
               tensor_cores=True, mma_v2=False, spill_allowance=0)
    return {**row, **kw}


def test_checks_can_fail():
    assert aot.check_row(_row()) == []
    assert "shared memory" in aot.check_row(_row(smem=aot.SMEM_LIMIT_SM90 + 1))[0]
    assert aot.check_row(_row(smem=aot.SMEM_LIMIT_SM90)) == []
    assert "spill" in aot.check_row(_row(spill_stores=8))[0]
    assert aot.check_row(_row(spill_stores=8, spill_allowance=8)) == []
    assert "wgmma" in aot.check_row(_row(mma="mma.sync"))[0]
    assert "wgmma" in aot.check_row(_row(mma=""))[0]
    assert aot.check_row(_row(mma="mma.sync", mma_v2=True)) == []
    assert "mma.sync" in aot.check_row(_row(mma="wgmma", mma_v2=True))[0]
    assert aot.check_row(_row(mma="", tensor_cores=False)) == []
    assert "does not compile" in aot.check_row(_row(error="CompilationError: x"))[0]


def _run_aot(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nova_rt.kernels.aot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_oversized_config_is_caught_by_the_real_compiler(tmp_path):
    """A packed-attention forward with 64 x 128 tiles at H=256 and 4 stages: real ptxas output must fail the
    shared-memory check (and compile otherwise), so the checks work on what the compiler reports."""
    script = (
        "import json, sys\n"
        "from nova_rt.kernels import aot\n"
        "spec = aot.launch_specs(match='_packed_attention_fwd_kernel [bf16 H=256 causal')[0]\n"
        "spec.constexprs.update(BLOCK_M=64, BLOCK_N=128, num_stages=4)\n"
        "print(json.dumps(aot.compile_spec(spec)))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not row.get("error"), row.get("error")
    assert row["smem"] > aot.SMEM_LIMIT_SM90
    assert any("shared memory" in msg for msg in aot.check_row(row))


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    """NOVA_RT_AOT_MATCH=text narrows the run to the launches whose "kernel [config]" contains text (iteration on one
    config); CI sets nothing and compiles all of them."""
    out, match = tmp_path / "aot.json", os.environ.get("NOVA_RT_AOT_MATCH")
    proc = _run_aot(["--json", str(out)] + (["--match", match] if match else []), timeout=3600)
    print(proc.stdout)  # the table: kernel, config, regs, spills, smem, mma, seconds
    assert out.exists(), proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["summary"]["configs"] == len(aot.launch_specs(match=match)) > 0
    assert not res["failures"], "\n".join(res["failures"])
    assert proc.returncode == 0, proc.stderr[-3000:]
